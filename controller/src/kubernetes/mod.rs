//! The Kubernetes driver (`fleetlb run`): BackendCluster objects from the API server.
//!
//! - A kube-runtime [`Controller`] calls [`reconcile`] per object: a finalizer guards deletion;
//!   the [`Core`] decides, as in standalone; status is written by server-side apply on
//!   `/status` and Events are Event objects ([`sink`]).
//! - Only the replica holding the Lease ([`crate::lease`]) acts on providers and writes; every
//!   replica runs the data plane, fed from the objects' specs and the endpoints in their status
//!   (the leader's decisions), and probes the endpoints itself.
//! - Failures back off per object, exponentially with jitter, so throttled objects do not
//!   retry in lockstep.

mod sink;
mod watched;

pub use sink::Events;
pub use watched::Watched;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetlb_crds::{BackendCluster, BackendClusterStatus};
use fleetlb_dataplane::RouteTable;
use futures::{FutureExt, StreamExt};
use kube::Client;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::core::delete::Deletion;
use crate::core::view::{ClusterView, StatusView};
use crate::core::{Core, Failure, Next, Settings, routes};
use crate::provider::ClusterKey;

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
    /// The core's settings ([`Settings::kubernetes`]; `sole_proxy` with
    /// `--no-leader-election`).
    pub core: Settings,
}

impl Default for KubeConfig {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(30),
            busy: Duration::from_secs(2),
            core: Settings::kubernetes(),
        }
    }
}

/// Reconcile errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a call.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The core's reconcile failed.
    #[error(transparent)]
    Core(#[from] Failure),
    /// Deletion waits (for what, in words).
    #[error("deletion in progress: {0}")]
    Terminating(String),
    /// The finalizer machinery failed.
    #[error(transparent)]
    Finalizer(Box<finalizer::Error<Error>>),
}

/// Where the driver is connected: the API, this replica's name in Events, leadership, and
/// where the data plane's routes and `/status` go.
pub struct Wiring {
    /// API client (with a read timeout: a hung API server fails the call).
    pub client: Client,
    /// This replica in Events.
    pub reporter: Reporter,
    /// Whether this replica holds the Lease.
    pub leader: watch::Receiver<bool>,
    /// Until when, by the clock, it may act on that (see [`crate::lease::Term`]).
    pub term: crate::lease::Term,
    /// Route table for the data plane.
    pub routes: watch::Sender<RouteTable>,
    /// `/status` JSON (the same shape as standalone's, for `fleetlb status`).
    pub status: watch::Sender<bytes::Bytes>,
}

/// A status this replica wrote.
struct Written {
    at: Instant,
    status: BackendClusterStatus,
    /// The object's `resourceVersion` a run of this replica's writes started from, and the
    /// versions those writes produced, latest last. While the store shows any of them (it lags
    /// behind this replica's own writes, one watch event at a time), the next write is made
    /// against the latest: only status changed in between, and only by this replica.
    over: Option<String>,
    made: Vec<String>,
    /// The object as the latest of those writes left it.
    object: Arc<BackendCluster>,
}

impl Written {
    /// How many of this replica's own consecutive writes are recognised in a lagging store.
    const CHAIN: usize = 16;

    /// Whether the object at `seen` is where this run of writes started or one of its writes.
    fn ours(&self, seen: &Option<String>) -> bool {
        *seen == self.over || seen.as_ref().is_some_and(|s| self.made.contains(s))
    }

    /// The `resourceVersion` to write against when the store shows the object at `seen`.
    fn against(&self, seen: &Option<String>) -> Option<String> {
        match self.made.last() {
            Some(latest) if self.ours(seen) => Some(latest.clone()),
            _ => seen.clone(),
        }
    }

    /// The record after a write decided from the object at `seen` produced `object`.
    fn after(
        previous: Option<&Written>,
        seen: Option<String>,
        status: BackendClusterStatus,
        object: BackendCluster,
    ) -> Written {
        let made = object.metadata.resource_version.clone();
        let (over, mut chain) = match previous {
            Some(w) if w.ours(&seen) => (w.over.clone(), w.made.clone()),
            _ => (seen, Vec::new()),
        };
        chain.extend(made);
        if chain.len() > Self::CHAIN {
            chain.drain(..chain.len() - Self::CHAIN);
        }
        Written {
            at: Instant::now(),
            status,
            over,
            made: chain,
            object: Arc::new(object),
        }
    }

    /// The object as this replica's latest write left it, when the store shows an earlier
    /// version this replica's writes went through (only status changed since, by this
    /// replica): deciding from the store's copy would write an older status over a newer one.
    fn newer_than(&self, seen: &Option<String>) -> Option<Arc<BackendCluster>> {
        (self.ours(seen) && self.made.last() != seen.as_ref()).then(|| self.object.clone())
    }
}

/// Everything a reconcile needs.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Event publisher.
    pub events: Events,
    /// Whether this replica holds the Lease.
    pub leader: watch::Receiver<bool>,
    /// Until when, by the clock, it may act on that.
    pub term: crate::lease::Term,
    /// Every BackendCluster, as the controller's reflector sees them.
    pub store: Store<Watched>,
    /// Route table for the data plane.
    pub routes: watch::Sender<RouteTable>,
    /// `/status` JSON.
    pub status: watch::Sender<bytes::Bytes>,
    /// Settings.
    pub cfg: KubeConfig,
    /// The shared controller core.
    pub core: Core,
    /// The last status written per object (by UID: a deleted and re-created object with the
    /// same name is another object), and when; writes of an unchanged status are skipped.
    /// Emptied when this replica becomes leader: what it wrote in an earlier term says nothing
    /// about what the leader in between wrote.
    written: Mutex<HashMap<String, Written>>,
    /// Set by reconciles; the route publisher (in [`run`]) rebuilds the table once for however
    /// many asked since it last did.
    routes_wanted: tokio::sync::Notify,
}

impl Context {
    /// A context over `core` and the objects of `store`.
    pub fn new(wiring: Wiring, core: Core, store: Store<Watched>, cfg: KubeConfig) -> Self {
        Self {
            events: Events::new(wiring.client.clone(), wiring.reporter),
            client: wiring.client,
            leader: wiring.leader,
            term: wiring.term,
            store,
            routes: wiring.routes,
            status: wiring.status,
            cfg,
            core,
            written: Mutex::default(),
            routes_wanted: tokio::sync::Notify::new(),
        }
    }

    fn is_leader(&self) -> bool {
        *self.leader.borrow() && self.term.valid()
    }

    /// Every object in the store that this binary can read (one with fields it does not know
    /// is read without them: it keeps being served as it was).
    pub fn objects(&self) -> Vec<Arc<BackendCluster>> {
        self.store
            .state()
            .iter()
            .filter_map(|w| w.object.as_ref().ok().cloned())
            .collect()
    }

    /// Rebuilds the data plane's route table from every object in the store (see
    /// [`routes::build_routes`]).
    pub fn publish_routes(&self) {
        routes::publish(&self.routes, &self.objects());
    }

    /// Publishes every object's spec summary and status as `/status` JSON.
    pub fn publish_status(&self) {
        let objects = self.objects();
        let view = StatusView {
            clusters: objects.iter().map(|o| ClusterView::new(o)).collect(),
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
}

/// Reconciles one BackendCluster (kube-runtime calls this; tests call it directly).
pub async fn reconcile(watched: Arc<Watched>, ctx: Arc<Context>) -> Result<Action, Error> {
    // The store changed (a reconcile follows every change): the table is rebuilt soon, once
    // for many reconciles (a rebuild reads every object: one per reconcile was O(n^2)).
    ctx.routes_wanted.notify_one();
    if !ctx.is_leader() {
        // Another replica acts; this one only serves.
        return Ok(Action::requeue(ctx.cfg.resync));
    }
    // A spec not acted on yet is read again from the API server itself before anything is
    // done about it: a watch opened before a newer CRD was applied is still served by the old
    // schema's storage (for up to two minutes), which drops the fields it does not know, so
    // an object using one would look like one this binary can act on.
    let watched = match fresh(&watched, &ctx).await? {
        Some(w) => w,
        None => return Ok(Action::await_change()),
    };
    let Some(mut bc) = watched.actionable().cloned() else {
        set_aside(&watched, &ctx).await?;
        return Ok(Action::requeue(ctx.cfg.resync));
    };
    if let Some(newer) = bc.metadata.uid.as_ref().and_then(|uid| {
        locked(&ctx.written)
            .get(uid)
            .and_then(|w| w.newer_than(&bc.metadata.resource_version))
    }) {
        bc = newer;
    }
    let started = Instant::now();
    let objects = ctx.objects();
    let settled = |next: Next| {
        Action::requeue(match next {
            Next::Busy | Next::Scaling => ctx.cfg.busy,
            Next::Settled => ctx.cfg.resync,
        })
    };
    // An object fleetlb will not act on gets its condition, and no finalizer.
    if bc.metadata.deletion_timestamp.is_none() && ctx.core.refusal(&bc, &objects).is_some() {
        let next = ctx.core.reconcile(&bc, &objects, ctx.as_ref()).await?;
        return Ok(settled(next));
    }
    let key = ClusterKey::of(&bc);
    let uid = bc.metadata.uid.clone().unwrap_or_default();
    let api: Api<BackendCluster> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let result = finalizer(&api, FINALIZER, bc, |event| async {
        match event {
            finalizer::Event::Apply(bc) => {
                let next = ctx.core.reconcile(&bc, &objects, ctx.as_ref()).await?;
                Ok(settled(next))
            }
            finalizer::Event::Cleanup(bc) => {
                match ctx.core.delete(&bc, &objects, ctx.as_ref()).await {
                    Deletion::Done => {
                        locked(&ctx.written).remove(&uid);
                        Ok(Action::await_change())
                    }
                    Deletion::Waiting(why) => Err(Error::Terminating(why)),
                    // Counted as a failure: retried with backoff, not at the busy period.
                    Deletion::Failed(e) => Err(Error::Core(Failure::Provider(e))),
                }
            }
        }
    })
    .await;
    ctx.core
        .metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    result.map_err(|e| Error::Finalizer(Box::new(e)))
}

/// `watched`, or the API server's copy of it when its generation has not been acted on yet
/// (`status.observedGeneration` behind `metadata.generation`); `None` when it is gone.
async fn fresh(watched: &Arc<Watched>, ctx: &Context) -> Result<Option<Arc<Watched>>, Error> {
    let observed = match &watched.object {
        Ok(bc) => bc.status.as_ref().and_then(|s| s.observed_generation),
        Err(_) => return Ok(Some(watched.clone())),
    };
    // Deleting: whatever fields it has, its instances go (as with any fleetlb version).
    if !watched.unknown.is_empty()
        || observed == watched.meta.generation
        || watched.meta.deletion_timestamp.is_some()
    {
        return Ok(Some(watched.clone()));
    }
    let key = ClusterKey::of_meta(&watched.meta);
    let api: Api<Watched> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let got = api.get_opt(&key.name).await?;
    Ok(got.filter(|w| w.meta.uid == watched.meta.uid).map(Arc::new))
}

/// An object this binary will not act on (fields it does not know, or unreadable): its `Ready`
/// condition says why, by a merge patch of the conditions alone, so nothing else of it (its
/// instances and launch intents above all) is touched. No provider call, no finalizer change.
async fn set_aside(watched: &Watched, ctx: &Context) -> Result<(), Error> {
    let Some((reason, message)) = watched.refusal() else {
        return Ok(());
    };
    let mut conditions: Vec<serde_json::Value> =
        watched.conditions.as_array().cloned().unwrap_or_default();
    let ready = conditions.iter().find(|c| c["type"] == "Ready");
    if ready.is_some_and(|c| {
        c["status"] == "False" && c["reason"] == reason && c["message"] == message.as_str()
    }) {
        return Ok(());
    }
    conditions.retain(|c| c["type"] != "Ready");
    conditions.push(serde_json::json!({
        "type": "Ready",
        "status": "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        "observedGeneration": watched.meta.generation,
    }));
    let key = ClusterKey::of_meta(&watched.meta);
    tracing::warn!(cluster = %key, reason, %message, "not acting on this BackendCluster");
    let api: Api<Watched> = Api::namespaced(ctx.client.clone(), &key.namespace);
    api.patch_status(
        &key.name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({
            "metadata": {"resourceVersion": watched.meta.resource_version},
            "status": {"conditions": conditions},
        })),
    )
    .await?;
    Ok(())
}

/// After an error: retry with per-object exponential backoff and jitter (waiting for
/// terminations is polled at the busy period instead).
pub fn error_policy(watched: Arc<Watched>, error: &Error, ctx: Arc<Context>) -> Action {
    let waiting = matches!(error, Error::Finalizer(f) if matches!(**f, finalizer::Error::CleanupFailed(Error::Terminating(_))));
    if waiting {
        return Action::requeue(ctx.cfg.busy);
    }
    let key = ClusterKey::of_meta(&watched.meta);
    tracing::warn!(cluster = %key, %error, "reconcile failed");
    Action::requeue(ctx.core.retry_delay(ctx.core.failed(&key)))
}

/// Terminates instances of this controller whose object no longer exists and that are older
/// than the grace period. Runs on the leader only, after the store has been filled. The store
/// can lag behind the API server (a stalled watch): before terminating, the API server itself
/// is asked whether each owner is really gone.
pub async fn sweep_orphans(ctx: &Context) {
    if !ctx.is_leader() {
        return;
    }
    // An object this binary cannot read may own any instance: nothing is an orphan until a
    // fleetlb that reads every object sweeps.
    if let Some(w) = ctx.store.state().iter().find(|w| w.object.is_err()) {
        tracing::warn!(
            cluster = w.meta.name.as_deref().unwrap_or_default(),
            "orphan sweep skipped: an object cannot be read"
        );
        return;
    }
    let confirm = |key: &ClusterKey| {
        let api: Api<BackendCluster> = Api::namespaced(ctx.client.clone(), &key.namespace);
        let name = key.name.clone();
        async move {
            match api.get_opt(&name).await {
                Ok(found) => Ok(found.and_then(|o| o.metadata.uid)),
                Err(e) => Err(e.to_string()),
            }
        }
        .boxed()
    };
    ctx.core.sweep(&ctx.objects(), None, &confirm).await;
}

/// The data behind `m`, also after a panic elsewhere poisoned it.
fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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

/// The route publisher rests this many times as long as a rebuild took before the next.
const ROUTES_DUTY: u32 = 4;

/// The longest time between two orphan sweeps.
const SWEEP_PERIOD: Duration = Duration::from_secs(30);

/// Health changes are taken at most this often: a flapping endpoint reconciles its cluster
/// about once a second at most, however fast it flaps (the set keeps every name meanwhile).
const HEALTH_COALESCE: Duration = Duration::from_secs(1);

/// Runs the controller until `shutdown`: the reconcile loop, a route-table refresh and the
/// orphan sweep. Returns an error at once when the API server does not serve BackendClusters
/// (the CRD is not installed).
pub async fn run(
    ctx_parts: impl FnOnce(Store<Watched>) -> Context,
    client: Client,
    ready: watch::Sender<bool>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), kube::Error> {
    let api: Api<Watched> = Api::all(client);
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
    // A replica that becomes leader reconciles everything at once rather than at the next
    // resync ...
    let became_leader = futures::stream::unfold(ctx.leader.clone(), |mut leader| async move {
        loop {
            leader.changed().await.ok()?;
            if *leader.borrow_and_update() {
                return Some(((), leader));
            }
        }
    });
    // ... and forgets what it wrote in an earlier term, at once (the stream above is polled
    // only when the controller gets to it, possibly in the middle of a reconcile).
    let new_term = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut leader = ctx.leader.clone();
            while leader.changed().await.is_ok() {
                if *leader.borrow_and_update() {
                    locked(&ctx.written).clear();
                }
            }
        })
    };
    let background = {
        let ctx = ctx.clone();
        let store = store.clone();
        tokio::spawn(async move {
            // kube-runtime's readiness gate wakes only the last task that polled it (one
            // oneshot waker shared by every waiter) and the controller's runner waits on it
            // too: poll again now and then rather than rely on a wake-up.
            loop {
                match tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready())
                    .await
                {
                    Ok(Ok(())) => break,
                    Ok(Err(_)) => return,
                    Err(_) => continue,
                }
            }
            ctx.publish_routes();
            ctx.publish_status();
            ready.send_replace(true);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // The route table follows reconciles at once, at most DUTY times as often as
                // a rebuild takes (thousands of objects); everything else once a second.
                let wanted = tokio::select! {
                    _ = tick.tick() => false,
                    () = ctx.routes_wanted.notified() => true,
                };
                let started = Instant::now();
                ctx.publish_routes();
                if wanted {
                    let gap = (started.elapsed() * ROUTES_DUTY).max(Duration::from_millis(10));
                    tokio::time::sleep(gap).await;
                    continue;
                }
                ctx.publish_status();
                // Objects gone without passing the finalizer (refused ones have none).
                let uids: std::collections::HashSet<String> = ctx
                    .store
                    .state()
                    .iter()
                    .filter_map(|w| w.meta.uid.clone())
                    .collect();
                locked(&ctx.written).retain(|uid, _| uids.contains(uid));
            }
        })
    };
    // The orphan sweep in a task of its own: a slow listing (EC2 throttling, up to the list
    // deadline) never holds up route publishing. At least every 30 s whatever the sync period,
    // so an orphan does not run (and cost) for as long as a long period.
    let sweeper = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let period = ctx.cfg.resync.min(SWEEP_PERIOD);
            let mut tick = tokio::time::interval_at(Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                sweep_orphans(&ctx).await;
            }
        })
    };
    // The autoscalers' readings (this proxy's and its peers' load), about once a second, on
    // every replica: a replica that becomes leader decides from a warm window. A peer that does
    // not answer delays only this loop, never route publishing.
    let sampler = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                ctx.core.sample().await;
            }
        })
    };
    // An endpoint that passes or fails its checks changes its cluster's status (`Ready`, the
    // ranked endpoints): that cluster is reconciled at once, not at its next resync.
    // At most once per HEALTH_COALESCE; an object waiting out the backoff of a failed
    // reconcile keeps waiting (a trigger would replace its scheduled retry).
    let health = futures::stream::unfold((ctx.clone(), Instant::now()), |(ctx, next)| async move {
        tokio::time::sleep_until(next).await;
        let changed = ctx.core.dataplane.health_changed().await;
        let due: Vec<ObjectRef<Watched>> = changed
            .iter()
            .map(|cluster| {
                let (ns, name) = cluster.split_once('/').unwrap_or(("default", cluster));
                ClusterKey {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                }
            })
            .filter(|key| !ctx.core.failing(key))
            .map(|key| ObjectRef::<Watched>::new(&key.name).within(&key.namespace))
            .collect();
        let next = Instant::now() + HEALTH_COALESCE;
        Some((futures::stream::iter(due), (ctx, next)))
    })
    .flatten();
    // An instance the interruption queue names has its object reconciled at once: it leaves
    // the endpoint set and its replacement is launched.
    let interrupted = futures::stream::unfold(ctx.clone(), |ctx| async move {
        ctx.core.cfg.notices.changed().await;
        let owners = if ctx.is_leader() {
            ctx.core.interrupted_owners(&ctx.objects()).await
        } else {
            Vec::new()
        };
        let due: Vec<ObjectRef<Watched>> = owners
            .into_iter()
            .map(|key| ObjectRef::<Watched>::new(&key.name).within(&key.namespace))
            .collect();
        Some((futures::stream::iter(due), ctx))
    })
    .flatten();
    // The interruption messages whose instances are going or gone are deleted: checked every
    // 2 s while any waits, by the leader.
    let settler = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if ctx.is_leader() {
                    ctx.core.settle_notices(&ctx.objects()).await;
                }
            }
        })
    };
    controller
        .with_config(kube::runtime::controller::Config::default().concurrency(16))
        .reconcile_all_on(became_leader)
        .reconcile_on(futures::stream::select(health, interrupted))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| std::future::ready(()))
        .await;
    background.abort();
    sweeper.abort();
    sampler.abort();
    settler.abort();
    new_term.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rv(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    /// The object a write left at version `v`.
    fn at(v: Option<String>) -> BackendCluster {
        let mut bc: BackendCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "fleetlb.dev/v1alpha1", "kind": "BackendCluster",
            "metadata": {"name": "web"},
            "spec": {"route": "/web", "replicas": 1, "instanceType": "t2.micro",
                     "provider": {"local": {}}},
        }))
        .unwrap();
        bc.metadata.resource_version = v;
        bc
    }

    #[test]
    fn writes_follow_their_own_versions_while_the_store_lags() {
        let s = BackendClusterStatus::default;
        // Decided from version 1, the write made 2; then from 1 again (the store has not seen
        // 2 yet), the write made 3.
        let first = Written::after(None, rv("1"), s(), at(rv("2")));
        assert_eq!(first.against(&rv("1")), rv("2"));
        let second = Written::after(Some(&first), rv("1"), s(), at(rv("3")));
        // The store now shows 2, this replica's own write: the next goes against 3.
        assert_eq!(second.against(&rv("2")), rv("3"));
        assert_eq!(second.against(&rv("3")), rv("3"));
        let third = Written::after(Some(&second), rv("2"), s(), at(rv("4")));
        assert_eq!(third.against(&rv("3")), rv("4"));
        // A reconcile from the store's copy at 3 decides from what 4 holds instead.
        let newer = third.newer_than(&rv("3")).expect("the latest own write");
        assert_eq!(newer.metadata.resource_version, rv("4"));
        assert!(third.newer_than(&rv("4")).is_none());
        assert!(third.newer_than(&rv("9")).is_none());
        // Someone else's version: written against as seen (a stale one gets 409).
        assert_eq!(third.against(&rv("9")), rv("9"));
        let fresh = Written::after(Some(&third), rv("9"), s(), at(rv("10")));
        assert_eq!(fresh.against(&rv("4")), rv("4"));
        assert_eq!(fresh.against(&rv("9")), rv("10"));
    }

    #[test]
    fn the_chain_of_own_writes_is_bounded() {
        let mut w = Written::after(None, rv("0"), BackendClusterStatus::default(), at(rv("1")));
        for i in 2..100 {
            w = Written::after(
                Some(&w),
                rv("0"),
                BackendClusterStatus::default(),
                at(Some(i.to_string())),
            );
        }
        assert_eq!(w.made.len(), Written::CHAIN);
        assert_eq!(w.against(&rv("99")), rv("99"));
    }
}
