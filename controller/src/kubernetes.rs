//! The Kubernetes driver (`fleetlb run`): BackendCluster objects from the API server.
//!
//! - A kube-runtime [`Controller`] calls [`reconcile`] per object: a finalizer guards deletion,
//!   the plan comes from the same [`execute`] code as standalone, status is written by
//!   server-side apply on `/status`, launches and terminations are Events.
//! - Only the replica holding the Lease ([`crate::lease`]) acts on providers and writes; every
//!   replica runs the data plane, fed from the objects' specs and the endpoints in their status
//!   (the leader's decisions), and probes the endpoints itself.
//! - Providers are listed once per kind for all objects ([`Inventory`]): reconciles of many
//!   objects within `inventory_max_age` share one `DescribeInstances`.
//! - Failures back off per object, exponentially with jitter, so throttled objects do not
//!   retry in lockstep.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetlb_crds::BackendCluster;
use fleetlb_dataplane::{Dataplane, RouteConfig, RouteTable};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, Resource};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::Providers;
use crate::execute::{self, Deletion};
use crate::metrics::Metrics;
use crate::provider::{ClusterKey, Instance, ProviderKind};
use crate::reconcile::set_condition;
use crate::standalone::{ClusterView, StatusView, route_config};

/// The finalizer fleetlb puts on every BackendCluster it manages.
pub const FINALIZER: &str = "fleetlb.dev/instances";
/// Field manager of fleetlb's server-side apply writes.
pub const MANAGER: &str = "fleetlb";

/// Kubernetes driver settings.
#[derive(Clone, Debug)]
pub struct KubeConfig {
    /// Reconcile period of a settled object (default 30 s).
    pub resync: Duration,
    /// Reconcile period while instances launch or drain (default 2 s).
    pub busy: Duration,
    /// Time between an instance leaving the endpoint set and its termination; long enough for
    /// every replica to see the status change (default 5 s).
    pub drain: Duration,
    /// Unowned instances older than this are terminated (default 60 s).
    pub orphan_grace: Duration,
    /// Deletion: how long to wait for the provider to list recent launches (default 2 min).
    pub launch_visibility: Duration,
    /// Provider listings younger than this are shared between reconciles (default 1 s).
    pub inventory_max_age: Duration,
    /// First and last per-object retry delays after an error (default 1 s and 5 min).
    pub backoff: (Duration, Duration),
    /// This process is the only proxy replica (`--no-leader-election`): it sees every request,
    /// so a retired instance is terminated as soon as its last request ends. With several
    /// replicas the leader cannot see the others' requests, and a retired instance gets its
    /// whole deregistration delay (default false).
    pub sole_proxy: bool,
}

impl Default for KubeConfig {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(30),
            busy: Duration::from_secs(2),
            drain: Duration::from_secs(5),
            orphan_grace: Duration::from_secs(60),
            launch_visibility: Duration::from_secs(120),
            inventory_max_age: Duration::from_secs(1),
            backoff: (Duration::from_secs(1), Duration::from_secs(300)),
            sole_proxy: false,
        }
    }
}

/// Reconcile errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a call.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A provider call failed.
    #[error(transparent)]
    Provider(#[from] crate::Error),
    /// No provider for `spec.provider` in this process.
    #[error("the {0} provider is not configured in this process")]
    NoProvider(ProviderKind),
    /// This replica stopped leading during the reconcile.
    #[error("this replica no longer holds the leader-election Lease")]
    NotLeader,
    /// Deletion waits (for what, in words).
    #[error("deletion in progress: {0}")]
    Terminating(String),
    /// The finalizer machinery failed.
    #[error(transparent)]
    Finalizer(Box<finalizer::Error<Error>>),
}

struct Listing {
    at: Instant,
    instances: Arc<Vec<Instance>>,
}

/// Provider listings shared between reconciles: one list call per provider kind per
/// `max_age`, for all objects. Each kind has its own lock, so a slow listing of one provider
/// never stalls reconciles of another.
pub struct Inventory {
    by_kind: BTreeMap<ProviderKind, tokio::sync::Mutex<Option<Listing>>>,
}

impl Default for Inventory {
    fn default() -> Self {
        Self {
            by_kind: ProviderKind::ALL
                .into_iter()
                .map(|k| (k, tokio::sync::Mutex::new(None)))
                .collect(),
        }
    }
}

impl Inventory {
    async fn get(
        &self,
        kind: ProviderKind,
        providers: &Providers,
        clusters: &[Arc<BackendCluster>],
        max_age: Duration,
    ) -> Result<Arc<Vec<Instance>>, Error> {
        let provider = providers.get(kind).ok_or(Error::NoProvider(kind))?;
        let Some(slot) = self.by_kind.get(&kind) else {
            return Err(Error::NoProvider(kind));
        };
        // Held across the call: concurrent reconciles wait for one listing instead of each
        // making their own.
        let mut cached = slot.lock().await;
        if let Some(l) = cached.as_ref()
            && l.at.elapsed() < max_age
        {
            return Ok(l.instances.clone());
        }
        let instances = Arc::new(provider.list(clusters).await?);
        *cached = Some(Listing {
            at: Instant::now(),
            instances: instances.clone(),
        });
        Ok(instances)
    }

    /// Forgets the listing of `kind` (after a launch or termination).
    async fn invalidate(&self, kind: ProviderKind) {
        if let Some(slot) = self.by_kind.get(&kind) {
            *slot.lock().await = None;
        }
    }

    /// This object's instances from every provider kind it uses or used (the spec's, and those
    /// its status still lists instances of, so a change of `spec.provider` retires the old ones).
    async fn instances_of(
        &self,
        bc: &BackendCluster,
        providers: &Providers,
        clusters: &[Arc<BackendCluster>],
        max_age: Duration,
    ) -> Result<(Vec<Instance>, BTreeSet<ProviderKind>), Error> {
        let key = ClusterKey::of(bc);
        let kinds = kinds_of(bc);
        let mut mine = Vec::new();
        for kind in &kinds {
            let listing = self.get(*kind, providers, clusters, max_age).await?;
            mine.extend(listing.iter().filter(|i| i.owner == key).cloned());
        }
        Ok((mine, kinds))
    }
}

/// The provider kinds `bc` uses (`spec.provider`), used at the last reconcile
/// (`status.provider`), or still has instances of (`status.instances`).
fn kinds_of(bc: &BackendCluster) -> BTreeSet<ProviderKind> {
    let mut kinds = BTreeSet::from([ProviderKind::of(&bc.spec.provider)]);
    kinds.extend(
        bc.status
            .as_ref()
            .and_then(|s| s.provider.as_deref())
            .and_then(ProviderKind::parse),
    );
    kinds.extend(
        bc.status
            .iter()
            .flat_map(|s| &s.instances)
            .filter(|i| i.state != "terminated")
            .filter_map(|i| i.provider.as_deref().and_then(ProviderKind::parse)),
    );
    kinds
}

/// Everything a reconcile needs.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Instance providers.
    pub providers: Providers,
    /// The local data plane: health and latency of endpoints, fed by [`Context::publish_routes`].
    pub dataplane: Dataplane,
    /// Controller metrics.
    pub metrics: Metrics,
    /// Event recorder.
    pub recorder: Recorder,
    /// Whether this replica holds the Lease.
    pub leader: watch::Receiver<bool>,
    /// Every BackendCluster, as the controller's reflector sees them.
    pub store: Store<BackendCluster>,
    /// Route table for the data plane.
    pub routes: watch::Sender<RouteTable>,
    /// `/status` JSON (the same shape as standalone's, for `fleetlb status`).
    pub status: watch::Sender<bytes::Bytes>,
    /// Settings.
    pub cfg: KubeConfig,
    inventory: Inventory,
    draining: Mutex<HashMap<ClusterKey, HashMap<String, Instant>>>,
    launch_backoff: Mutex<HashMap<ClusterKey, execute::LaunchBackoff>>,
    failures: Mutex<HashMap<ClusterKey, u32>>,
    written: Mutex<HashMap<ClusterKey, (Instant, fleetlb_crds::BackendClusterStatus)>>,
}

impl Context {
    /// A context; `reporter` names this replica in Events.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        reporter: Reporter,
        providers: Providers,
        dataplane: Dataplane,
        metrics: Metrics,
        leader: watch::Receiver<bool>,
        store: Store<BackendCluster>,
        routes: watch::Sender<RouteTable>,
        status: watch::Sender<bytes::Bytes>,
        cfg: KubeConfig,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            providers,
            dataplane,
            metrics,
            leader,
            store,
            routes,
            status,
            cfg,
            inventory: Inventory::default(),
            draining: Mutex::default(),
            launch_backoff: Mutex::default(),
            failures: Mutex::default(),
            written: Mutex::default(),
        }
    }

    /// Drops every per-object record of a deleted object.
    fn forget(&self, key: &ClusterKey) {
        locked(&self.draining).remove(key);
        locked(&self.launch_backoff).remove(key);
        locked(&self.failures).remove(key);
        locked(&self.written).remove(key);
    }

    fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Requests in flight per instance, where this process is the only proxy (see
    /// [`KubeConfig::sole_proxy`]).
    fn inflight(&self) -> Option<HashMap<String, u32>> {
        self.cfg.sole_proxy.then(|| self.dataplane.inflight())
    }

    /// Rebuilds the data plane's route table from every object in the store: its spec, and the
    /// endpoints the leader published in its status. An object being deleted leaves the table;
    /// of two objects claiming one route, the older keeps it; an object whose spec fails
    /// validation keeps the route it had.
    pub fn publish_routes(&self) {
        let current = self.routes.borrow().clone();
        let routes = build_routes(&self.store.state(), &current);
        self.routes.send_if_modified(|cur| {
            if cur.routes == routes {
                false
            } else {
                cur.routes = routes;
                true
            }
        });
    }

    /// Publishes every object's spec summary and status as `/status` JSON.
    pub fn publish_status(&self) {
        let objects = self.store.state();
        let clusters = objects
            .iter()
            .map(|o| {
                let created = o
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0.to_string())
                    .unwrap_or_default();
                ClusterView::new(o, created, o.metadata.deletion_timestamp.is_some())
            })
            .collect();
        let view = StatusView {
            clusters,
            errors: Vec::new(),
        };
        let body = bytes::Bytes::from(view.to_json());
        self.status.send_if_modified(|cur| {
            if *cur == body {
                false
            } else {
                *cur = body;
                true
            }
        });
    }

    async fn event(&self, bc: &BackendCluster, type_: EventType, reason: &str, note: String) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &bc.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "cannot publish an Event");
        }
    }

    /// Writes `status` by server-side apply unless it equals the current one (latency figures
    /// aside, which are refreshed once per resync period rather than on every change).
    async fn write_status(
        &self,
        bc: &BackendCluster,
        status: fleetlb_crds::BackendClusterStatus,
    ) -> Result<(), Error> {
        let key = ClusterKey::of(bc);
        let unchanged = locked(&self.written).get(&key).is_some_and(|(at, last)| {
            at.elapsed() < self.cfg.resync
                && (same_status(last, &status)
                    || bc.status.as_ref().is_some_and(|s| same_status(s, &status)))
        });
        if unchanged {
            return Ok(());
        }
        // A replica that lost the Lease while its reconcile ran must not overwrite what the
        // new leader wrote (its launch intents above all).
        if !self.is_leader() {
            return Err(Error::NotLeader);
        }
        let api: Api<BackendCluster> = Api::namespaced(self.client.clone(), &key.namespace);
        let patch = serde_json::json!({
            "apiVersion": BackendCluster::api_version(&()),
            "kind": BackendCluster::kind(&()),
            "status": &status,
        });
        api.patch_status(
            &key.name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        locked(&self.written).insert(key, (Instant::now(), status));
        Ok(())
    }
}

/// The data behind `m`, also after a panic elsewhere poisoned it (every map here stays
/// consistent between statements).
fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Equal statuses once latency figures and condition timestamps are set aside.
fn same_status(
    a: &fleetlb_crds::BackendClusterStatus,
    b: &fleetlb_crds::BackendClusterStatus,
) -> bool {
    let strip = |s: &fleetlb_crds::BackendClusterStatus| {
        let mut s = s.clone();
        s.instances.iter_mut().for_each(|i| i.latency_ms = None);
        s.endpoints.iter_mut().for_each(|e| e.latency_ms = None);
        s
    };
    strip(a) == strip(b)
}

/// The route table for `objects`; `current` supplies the routes of objects that fail
/// validation (they keep serving what they served).
pub fn build_routes(objects: &[Arc<BackendCluster>], current: &RouteTable) -> Vec<RouteConfig> {
    let mut live: Vec<&Arc<BackendCluster>> = objects
        .iter()
        .filter(|o| o.metadata.deletion_timestamp.is_none())
        .collect();
    // Oldest first: it keeps a contested route.
    live.sort_by_cached_key(|o| seniority(o));
    let mut claimed: HashSet<String> = HashSet::new();
    let mut out = BTreeMap::new();
    for o in live {
        let key = ClusterKey::of(o);
        let cluster = key.to_string();
        let route = if o.validate().is_ok() {
            Some(route_config(&key, o, execute::status_endpoints(o)))
        } else {
            current
                .routes
                .iter()
                .find(|r| r.cluster == cluster)
                .cloned()
        };
        if let Some(r) = route
            && claimed.insert(r.prefix.clone())
        {
            out.insert(cluster, r);
        }
    }
    out.into_values().collect()
}

/// Which of two objects claiming one route keeps it: the older, then the first by key.
fn seniority(o: &BackendCluster) -> (Option<Timestamp>, ClusterKey) {
    (
        o.metadata.creation_timestamp.as_ref().map(|t| t.0),
        ClusterKey::of(o),
    )
}

/// The object holding `bc`'s route before it, if any.
fn route_holder(bc: &BackendCluster, objects: &[Arc<BackendCluster>]) -> Option<ClusterKey> {
    let mine = seniority(bc);
    objects
        .iter()
        .filter(|o| o.metadata.deletion_timestamp.is_none() && o.spec.route == bc.spec.route)
        .map(|o| seniority(o))
        .filter(|s| *s < mine)
        .min()
        .map(|(_, key)| key)
}

/// Reconciles one BackendCluster (kube-runtime calls this; tests call it directly).
pub async fn reconcile(bc: Arc<BackendCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.publish_routes();
    if !ctx.is_leader() {
        // Another replica acts; this one only serves.
        return Ok(Action::requeue(ctx.cfg.resync));
    }
    let started = Instant::now();
    let key = ClusterKey::of(&bc);
    let now = Timestamp::now();
    if bc.metadata.deletion_timestamp.is_none() {
        let refusal = match bc.validate() {
            Err(errors) => Some((
                "InvalidSpec",
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            )),
            Ok(()) => route_holder(&bc, &ctx.store.state()).map(|other| {
                (
                    "RouteConflict",
                    format!("spec.route: {} is already served by {other}", bc.spec.route),
                )
            }),
        };
        if let Some((reason, message)) = refusal {
            // No provider call for a spec fleetlb will not act on.
            let mut status = bc.status.clone().unwrap_or_default();
            status.observed_generation = bc.metadata.generation;
            for type_ in ["Ready", "Degraded"] {
                set_condition(
                    &mut status.conditions,
                    type_,
                    type_ == "Degraded",
                    reason,
                    &message,
                    bc.metadata.generation,
                    now,
                );
            }
            if bc.status.as_ref() != Some(&status) {
                ctx.event(&bc, EventType::Warning, reason, message.clone())
                    .await;
            }
            ctx.write_status(&bc, status).await?;
            tracing::warn!(cluster = %key, reason, %message, "not acting on this BackendCluster");
            return Ok(Action::requeue(ctx.cfg.resync));
        }
    }
    let api: Api<BackendCluster> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let result = finalizer(&api, FINALIZER, bc, |event| async {
        match event {
            finalizer::Event::Apply(bc) => apply(&bc, &ctx).await,
            finalizer::Event::Cleanup(bc) => cleanup(&bc, &ctx).await,
        }
    })
    .await;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(action) => {
            locked(&ctx.failures).remove(&key);
            Ok(action)
        }
        Err(e) => Err(Error::Finalizer(Box::new(e))),
    }
}

async fn apply(bc: &BackendCluster, ctx: &Context) -> Result<Action, Error> {
    let key = ClusterKey::of(bc);
    let kind = ProviderKind::of(&bc.spec.provider);
    let now = Timestamp::now();
    let (mine, kinds) = match ctx
        .inventory
        .instances_of(
            bc,
            &ctx.providers,
            &ctx.store.state(),
            ctx.cfg.inventory_max_age,
        )
        .await
    {
        Ok(l) => l,
        Err(e) => {
            let msg = e.to_string();
            let reason = match execute::error_reason(&msg) {
                "LaunchFailed" => "ProviderError",
                r => r,
            };
            let mut status = bc.status.clone().unwrap_or_default();
            set_condition(
                &mut status.conditions,
                "Degraded",
                true,
                reason,
                &msg,
                bc.metadata.generation,
                now,
            );
            ctx.metrics.reconcile.with_label_values(&["error"]).inc();
            ctx.write_status(bc, status).await?;
            return Err(e);
        }
    };
    let provider = ctx.providers.get(kind).ok_or(Error::NoProvider(kind))?;
    let health = execute::health_by_cluster(&ctx.dataplane)
        .remove(&key.to_string())
        .unwrap_or_default();
    let inflight = ctx.inflight();
    let mut draining = locked(&ctx.draining).remove(&key).unwrap_or_default();
    let mut launch_backoff = locked(&ctx.launch_backoff).remove(&key).unwrap_or_default();
    let applied = execute::apply(
        bc,
        execute::Inputs {
            provider: provider.as_ref(),
            providers: &ctx.providers,
            instances: &mine,
            health: &health,
            inflight: inflight.as_ref(),
            draining: &mut draining,
            drain: ctx.cfg.drain,
            metrics: &ctx.metrics,
            backoff: &mut launch_backoff,
            backoff_range: ctx.cfg.backoff,
        },
        now,
        &|status| {
            Box::pin(async move {
                ctx.write_status(bc, status)
                    .await
                    .map_err(|e| e.to_string())
            })
        },
    )
    .await;
    locked(&ctx.draining).insert(key.clone(), draining);
    locked(&ctx.launch_backoff).insert(key.clone(), launch_backoff);
    if !applied.launched.is_empty() || !applied.terminated.is_empty() {
        for k in &kinds {
            ctx.inventory.invalidate(*k).await;
        }
    }
    // Status first: it takes retired instances out of every replica's endpoint set.
    ctx.write_status(bc, applied.status).await?;
    if !applied.launched.is_empty() {
        let list: Vec<String> = applied
            .launched
            .iter()
            .map(|(id, slot)| format!("{id} (slot {slot})"))
            .collect();
        ctx.event(
            bc,
            EventType::Normal,
            "Launched",
            format!(
                "launched {} {}: {}",
                list.len(),
                bc.spec.instance_type,
                list.join(", ")
            ),
        )
        .await;
    }
    if !applied.retired.is_empty() {
        ctx.event(
            bc,
            EventType::Normal,
            "Retiring",
            format!(
                "{} left the endpoint set; terminating after the drain period",
                applied.retired.join(", ")
            ),
        )
        .await;
    }
    if !applied.terminated.is_empty() {
        ctx.event(
            bc,
            EventType::Normal,
            "Terminated",
            format!("terminated {}", applied.terminated.join(", ")),
        )
        .await;
    }
    if let Some((reason, msg)) = applied.launch_error {
        ctx.event(bc, EventType::Warning, reason, msg.clone()).await;
        return Err(Error::Provider(crate::Error::Provider {
            provider: provider.name(),
            operation: "launch",
            message: msg,
        }));
    }
    Ok(Action::requeue(if applied.busy {
        ctx.cfg.busy
    } else {
        ctx.cfg.resync
    }))
}

async fn cleanup(bc: &BackendCluster, ctx: &Context) -> Result<Action, Error> {
    let key = ClusterKey::of(bc);
    let kinds = kinds_of(bc);
    if kinds.iter().all(|k| ctx.providers.get(*k).is_none()) {
        // Nothing this process could clean up; do not hold the object forever.
        tracing::warn!(cluster = %key, provider = %ProviderKind::of(&bc.spec.provider), "deleting without a configured provider");
        return Ok(Action::await_change());
    }
    for k in &kinds {
        ctx.inventory.invalidate(*k).await;
    }
    let (mine, _) = ctx
        .inventory
        .instances_of(bc, &ctx.providers, &ctx.store.state(), Duration::ZERO)
        .await?;
    let uid = bc.metadata.uid.clone().unwrap_or_default();
    let mine: Vec<Instance> = mine.into_iter().filter(|i| i.belongs_to(&uid)).collect();
    let mut deleting = bc.clone();
    let step = execute::delete(
        &mut deleting,
        &ctx.providers,
        &mine,
        ctx.inflight().as_ref(),
        Timestamp::now(),
        execute::DeleteSettings {
            drain: ctx.cfg.drain,
            launch_visibility: ctx.cfg.launch_visibility,
        },
    )
    .await;
    match step {
        Deletion::Done => {
            execute::forget_cluster(&ctx.metrics, &key);
            ctx.forget(&key);
            ctx.event(
                bc,
                EventType::Normal,
                "Deleted",
                match bc.spec.deletion_policy {
                    fleetlb_crds::DeletionPolicy::Delete => {
                        "every instance terminated; deletion complete".to_string()
                    }
                    fleetlb_crds::DeletionPolicy::Orphan => format!(
                        "{} instance(s) left running and released (deletionPolicy: Orphan)",
                        mine.iter().filter(|i| i.state.needs_terminate()).count()
                    ),
                },
            )
            .await;
            Ok(Action::await_change())
        }
        Deletion::Waiting(why) => {
            for k in &kinds {
                ctx.inventory.invalidate(*k).await;
            }
            execute::mark_deleting(&mut deleting, &why, Timestamp::now());
            let status = deleting.status.unwrap_or_default();
            if let Err(e) = ctx.write_status(bc, status).await {
                tracing::warn!(cluster = %key, error = %e, "cannot write the deletion status");
            }
            Err(Error::Terminating(why))
        }
    }
}

/// After an error: retry with per-object exponential backoff and jitter (waiting for
/// terminations is polled at the busy period instead).
pub fn error_policy(bc: Arc<BackendCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    let waiting = matches!(error, Error::Finalizer(f) if matches!(**f, finalizer::Error::CleanupFailed(Error::Terminating(_))));
    if waiting {
        return Action::requeue(ctx.cfg.busy);
    }
    tracing::warn!(cluster = %ClusterKey::of(&bc), %error, "reconcile failed");
    let n = {
        let mut f = locked(&ctx.failures);
        let n = f.entry(ClusterKey::of(&bc)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    Action::requeue(backoff(ctx.cfg.backoff, n))
}

pub use crate::execute::backoff;

/// Terminates instances of this controller whose object no longer exists and that are older
/// than the grace period. Runs on the leader only, after the store has been filled.
pub async fn sweep_orphans(ctx: &Context) {
    if !ctx.is_leader() {
        return;
    }
    let objects = ctx.store.state();
    // An instance belongs to an object by (namespace/name, UID): one of a deleted object's
    // predecessor under the same name is no object's.
    let owners: HashSet<(ClusterKey, String)> = objects
        .iter()
        .map(|o| {
            (
                ClusterKey::of(o),
                o.metadata.uid.clone().unwrap_or_default(),
            )
        })
        .collect();
    for kind in [ProviderKind::Aws, ProviderKind::Local] {
        let Some(p) = ctx.providers.get(kind) else {
            continue;
        };
        let Ok(listing) = ctx
            .inventory
            .get(kind, &ctx.providers, &objects, ctx.cfg.inventory_max_age)
            .await
        else {
            continue;
        };
        let candidates: Vec<&Instance> = listing
            .iter()
            .filter(|i| {
                i.state.needs_terminate()
                    && !owners.contains(&(i.owner.clone(), i.owner_uid.clone()))
            })
            .filter(|i| {
                i.launched_at
                    .elapsed()
                    .is_ok_and(|age| age >= ctx.cfg.orphan_grace)
            })
            .collect();
        // The store can lag behind the API server (a stalled watch): before terminating, ask
        // the API server itself whether each owner is really gone.
        let mut orphans = Vec::new();
        let mut checked: HashMap<ClusterKey, Option<String>> = HashMap::new();
        for i in candidates {
            let uid = match checked.get(&i.owner) {
                Some(uid) => uid.clone(),
                None => {
                    let api: Api<BackendCluster> =
                        Api::namespaced(ctx.client.clone(), &i.owner.namespace);
                    let found = match api.get_opt(&i.owner.name).await {
                        Ok(found) => found,
                        Err(e) => {
                            // Cannot tell: terminate nothing more this time (a hung API server
                            // would cost a read timeout per instance otherwise).
                            tracing::warn!(cluster = %i.owner, error = %e, "orphan sweep: cannot confirm the owner is gone; sweeping later");
                            break;
                        }
                    };
                    let uid = found.and_then(|o| o.metadata.uid);
                    checked.insert(i.owner.clone(), uid.clone());
                    uid
                }
            };
            if uid.as_deref() != Some(i.owner_uid.as_str()) {
                orphans.push(i.id.clone());
            }
        }
        if orphans.is_empty() || !ctx.is_leader() {
            continue;
        }
        tracing::warn!(provider = %kind, ids = ?orphans, "orphan instances: no BackendCluster owns them; terminating");
        if p.terminate(&orphans).await.is_ok() {
            ctx.metrics.orphans_terminated.inc_by(orphans.len() as u64);
            ctx.inventory.invalidate(kind).await;
        }
    }
}

/// This install's id in a cluster, when `--controller-id` is not given: `fleetlb-` and the
/// UID of the `kube-system` namespace, which is unique per cluster and survives controller
/// reinstalls (the identity cluster-identity tools use). Two clusters in one AWS account and
/// region therefore never see each other's instances as theirs.
pub async fn controller_id_from_cluster(client: Client) -> Result<String, kube::Error> {
    use k8s_openapi::api::core::v1::Namespace;
    let ns: Api<Namespace> = Api::all(client);
    let uid = ns
        .get("kube-system")
        .await?
        .metadata
        .uid
        .unwrap_or_default();
    if uid.is_empty() {
        return Err(kube::Error::Service(
            "namespace kube-system has no metadata.uid".into(),
        ));
    }
    Ok(format!("fleetlb-{uid}"))
}

/// Runs the controller until `shutdown`: the reconcile loop, a route-table refresh and the
/// orphan sweep. Returns an error at once when the API server does not serve BackendClusters
/// (the CRD is not installed).
pub async fn run(
    ctx_parts: impl FnOnce(Store<BackendCluster>) -> Context,
    client: Client,
    ready: watch::Sender<bool>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), kube::Error> {
    let api: Api<BackendCluster> = Api::all(client);
    api.list(&kube::api::ListParams::default().limit(1))
        .await
        .map_err(|e| {
            match &e {
                kube::Error::Api(s) if s.code == 404 => tracing::error!(
                    "the API server does not serve BackendClusters: install the CRD with kubectl apply -f manifests/crd.yaml"
                ),
                _ => tracing::error!(error = %e, "cannot list BackendClusters"),
            }
            e
        })?;
    let controller = Controller::new(api, watcher::Config::default().any_semantic());
    let store = controller.store();
    let ctx = Arc::new(ctx_parts(store.clone()));
    // A replica that becomes leader reconciles everything at once rather than at the next resync.
    let became_leader = futures::stream::unfold(ctx.leader.clone(), |mut leader| async move {
        loop {
            leader.changed().await.ok()?;
            if *leader.borrow_and_update() {
                return Some(((), leader));
            }
        }
    });
    let background = {
        let ctx = ctx.clone();
        let store = store.clone();
        tokio::spawn(async move {
            if store.wait_until_ready().await.is_err() {
                return;
            }
            ctx.publish_routes();
            ctx.publish_status();
            ready.send_replace(true);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut last_sweep = Instant::now();
            loop {
                tick.tick().await;
                ctx.publish_routes();
                ctx.publish_status();
                if last_sweep.elapsed() >= ctx.cfg.resync {
                    last_sweep = Instant::now();
                    sweep_orphans(&ctx).await;
                }
            }
        })
    };
    controller
        .with_config(kube::runtime::controller::Config::default().concurrency(16))
        .reconcile_all_on(became_leader)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| std::future::ready(()))
        .await;
    background.abort();
    Ok(())
}
