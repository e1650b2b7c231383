//! The standalone driver: BackendClusters from YAML files in a directory, no Kubernetes.
//!
//! It behaves like the API server plus controller would: an edit that fails validation is
//! rejected (logged once, shown in `/status`) and the object keeps its last valid spec; a file
//! that stops parsing leaves its objects as they were; a removed document or file deletes its
//! objects (after terminating their instances under `deletionPolicy: Delete`). Objects have no
//! API-server UID here: each gets a stable one derived from its namespace and name.
//!
//! Each pass lists every provider once for all clusters, runs [`reconcile::plan`] per object,
//! executes the plan, publishes the route table to the data plane and the status to `/status`.
//! Instances leave the route table first and are terminated one drain period later.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetlb_crds::BackendCluster;
use fleetlb_dataplane::{
    BalancingConfig, Dataplane, HealthConfig, OutlierConfig, Policy, RouteConfig, RouteTable,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::Providers;
use crate::execute::{self, Deletion};
use crate::files::{self, FileLoad};
use crate::metrics::Metrics;
use crate::provider::{ClusterKey, Instance, ProviderKind, fnv64};
use crate::reconcile::{self, set_condition};

/// Standalone driver settings.
#[derive(Clone, Debug)]
pub struct StandaloneConfig {
    /// Directory of BackendCluster YAML files.
    pub dir: PathBuf,
    /// How often the directory is checked for changes (default 500 ms).
    pub poll: Duration,
    /// Reconcile period without changes (default 2 s).
    pub resync: Duration,
    /// Time between an instance leaving the route table and its termination (default 2 s).
    pub drain: Duration,
    /// Instances of this controller that no object owns are terminated once this old
    /// (default 30 s, Karpenter's).
    pub orphan_grace: Duration,
    /// Deletion: how long to wait for the provider to list recent launches (default 2 min).
    pub launch_visibility: Duration,
    /// First and longest delay before retrying a failed launch (default 1 s and 5 min; doubled
    /// per failure, jittered; an edit of the object retries at once).
    pub launch_backoff: (Duration, Duration),
}

impl StandaloneConfig {
    /// Defaults for `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            poll: Duration::from_millis(500),
            resync: Duration::from_secs(2),
            drain: Duration::from_secs(2),
            orphan_grace: Duration::from_secs(30),
            launch_visibility: Duration::from_secs(120),
            launch_backoff: (Duration::from_secs(1), Duration::from_secs(300)),
        }
    }
}

/// Where the driver publishes.
pub struct Outputs {
    /// Route table for the data plane.
    pub routes: watch::Sender<RouteTable>,
    /// `/status` JSON.
    pub status: watch::Sender<Bytes>,
    /// Set once the first pass has published a route table.
    pub ready: watch::Sender<bool>,
}

struct Tracked {
    obj: BackendCluster,
    file: PathBuf,
    rejected: Option<String>,
    deleting: bool,
    draining: HashMap<String, Instant>,
    backoff: execute::LaunchBackoff,
    created: Timestamp,
}

/// One cluster in `/status` (what `fleetlb status` prints), in every driver.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ClusterView<'a> {
    namespace: &'a str,
    name: &'a str,
    route: &'a str,
    instance_type: &'a str,
    provider: &'static str,
    desired: usize,
    created: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<String>,
    deleting: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    rejected_edit: Option<&'a str>,
    status: &'a Option<fleetlb_crds::BackendClusterStatus>,
}

impl<'a> ClusterView<'a> {
    pub(crate) fn new(obj: &'a BackendCluster, created: String, deleting: bool) -> Self {
        Self {
            namespace: obj.metadata.namespace.as_deref().unwrap_or("default"),
            name: obj.metadata.name.as_deref().unwrap_or(""),
            route: &obj.spec.route,
            instance_type: &obj.spec.instance_type,
            provider: obj.spec.provider.kind(),
            desired: reconcile::desired_replicas(obj),
            created,
            file: None,
            deleting,
            rejected_edit: None,
            status: &obj.status,
        }
    }
}

/// The `/status` document.
#[derive(Serialize)]
pub(crate) struct StatusView<'a> {
    pub(crate) clusters: Vec<ClusterView<'a>>,
    pub(crate) errors: Vec<&'a str>,
}

impl StatusView<'_> {
    pub(crate) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}

/// The standalone driver's state.
pub struct Standalone {
    metrics: Metrics,
    cfg: StandaloneConfig,
    providers: Providers,
    dataplane: Dataplane,
    tracked: BTreeMap<ClusterKey, Tracked>,
    errors: Vec<String>,
    logged: HashSet<String>,
    last_hash: Option<u64>,
    /// The directory's files as last read (a poll re-reads only changed ones).
    file_cache: files::FileCache,
    loaded_once: bool,
    used_kinds: HashSet<ProviderKind>,
}

impl Standalone {
    /// A driver over `cfg.dir` using `providers`, reading health from `dataplane`.
    pub fn new(
        cfg: StandaloneConfig,
        providers: Providers,
        dataplane: Dataplane,
        metrics: Metrics,
    ) -> Self {
        metrics.leader.set(1);
        Self {
            metrics,
            cfg,
            providers,
            dataplane,
            tracked: BTreeMap::new(),
            errors: Vec::new(),
            logged: HashSet::new(),
            last_hash: None,
            file_cache: files::FileCache::default(),
            loaded_once: false,
            used_kinds: HashSet::new(),
        }
    }

    /// Runs until `shutdown` completes. Instances are left to the caller (the local provider's
    /// `shutdown` ends its children).
    pub async fn run(mut self, out: Outputs, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut next_pass = Instant::now();
        loop {
            let changed = self.load();
            if changed || Instant::now() >= next_pass || !self.loaded_once {
                let busy = self.pass(&out).await;
                // While instances are launching or draining, look again soon.
                let wait = if busy {
                    self.cfg.poll.min(self.cfg.resync)
                } else {
                    self.cfg.resync
                };
                next_pass = Instant::now() + wait;
            }
            tokio::select! {
                () = tokio::time::sleep(self.cfg.poll) => {}
                () = &mut shutdown => return,
            }
        }
    }

    /// One load of the directory and one reconcile pass (for tests and tools that drive the
    /// loop themselves); returns whether anything is still in motion.
    pub async fn step(&mut self, out: &Outputs) -> bool {
        self.load();
        self.pass(out).await
    }

    /// Reads the directory; returns whether anything changed.
    fn load(&mut self) -> bool {
        let (hash, texts) = match files::read_dir_cached(&self.cfg.dir, &mut self.file_cache) {
            Ok(x) => x,
            Err(e) => {
                let msg = format!("{}: cannot read directory: {e}", self.cfg.dir.display());
                self.report(vec![msg]);
                return false;
            }
        };
        if self.last_hash == Some(hash) {
            return false;
        }
        self.last_hash = Some(hash);
        self.loaded_once = true;
        let loads: Vec<FileLoad> = texts.iter().map(|(p, t)| files::parse_file(p, t)).collect();
        self.apply(loads);
        true
    }

    fn apply(&mut self, loads: Vec<FileLoad>) {
        let now = Timestamp::now();
        let mut errors = Vec::new();
        let mut present: HashSet<ClusterKey> = HashSet::new();
        let mut defined_in: HashMap<ClusterKey, PathBuf> = HashMap::new();
        for load in loads {
            let docs = match load.outcome {
                Ok(docs) => docs,
                Err(e) => {
                    // Unparseable file: everything it held before stays as it was.
                    for (k, t) in &self.tracked {
                        if t.file == load.path {
                            present.insert(k.clone());
                        }
                    }
                    errors.push(e);
                    continue;
                }
            };
            for doc in docs {
                if let Some(key) = &doc.key {
                    if let Some(first) = defined_in.get(key) {
                        errors.push(format!(
                            "{}: BackendCluster {}/{} (document {}): metadata.name: already defined in {}",
                            load.path.display(), key.namespace, key.name, doc.index, first.display()
                        ));
                        continue;
                    }
                    defined_in.insert(key.clone(), load.path.clone());
                    present.insert(key.clone());
                }
                match (doc.result, doc.key) {
                    (Ok(bc), Some(key)) => self.upsert(key, bc, &load.path, now, &mut errors),
                    (Err(e), Some(key)) => {
                        if let Some(t) = self.tracked.get_mut(&key) {
                            t.rejected = Some(e.clone());
                        }
                        errors.push(e);
                    }
                    (Err(e), None) => errors.push(e),
                    (Ok(_), None) => {}
                }
            }
        }
        for (key, t) in self.tracked.iter_mut() {
            if !present.contains(key) && !t.deleting {
                tracing::info!(cluster = %key, "BackendCluster removed from {}; deleting", t.file.display());
                t.deleting = true;
                t.obj.metadata.deletion_timestamp = Some(Time(now));
            }
        }
        self.report(errors);
    }

    fn upsert(
        &mut self,
        key: ClusterKey,
        mut bc: BackendCluster,
        file: &Path,
        now: Timestamp,
        errors: &mut Vec<String>,
    ) {
        let clash = self
            .tracked
            .iter()
            .find(|(k, t)| **k != key && !t.deleting && t.obj.spec.route == bc.spec.route);
        if let Some((other, _)) = clash {
            let e = format!(
                "{}: BackendCluster {}/{}: spec.route: {} is already served by {}",
                file.display(),
                key.namespace,
                key.name,
                bc.spec.route,
                other
            );
            if let Some(t) = self.tracked.get_mut(&key) {
                t.rejected = Some(e.clone());
            }
            errors.push(e);
            return;
        }
        match self.tracked.get_mut(&key) {
            Some(t) => {
                t.rejected = None;
                t.file = file.to_path_buf();
                if t.deleting {
                    t.deleting = false;
                    t.obj.metadata.deletion_timestamp = None;
                }
                if t.obj.spec != bc.spec {
                    t.obj.spec = bc.spec;
                    t.obj.metadata.generation = Some(t.obj.metadata.generation.unwrap_or(1) + 1);
                    tracing::info!(cluster = %key, generation = t.obj.metadata.generation, "spec changed");
                }
            }
            None => {
                if bc.metadata.uid.is_none() {
                    let id = fnv64(format!("{}/{}", key.namespace, key.name).as_bytes());
                    bc.metadata.uid = Some(format!("standalone-{id:016x}"));
                }
                bc.metadata.generation = Some(1);
                tracing::info!(cluster = %key, route = %bc.spec.route, replicas = bc.spec.replicas, provider = bc.spec.provider.kind(), "BackendCluster added");
                self.tracked.insert(
                    key,
                    Tracked {
                        obj: bc,
                        file: file.to_path_buf(),
                        rejected: None,
                        deleting: false,
                        draining: HashMap::new(),
                        backoff: execute::LaunchBackoff::default(),
                        created: now,
                    },
                );
            }
        }
    }

    /// Logs each problem once (until it goes away and comes back).
    fn report(&mut self, errors: Vec<String>) {
        let now: HashSet<String> = errors.iter().cloned().collect();
        for e in &errors {
            if !self.logged.contains(e) {
                tracing::error!("{e}");
            }
        }
        self.logged = now;
        self.errors = errors;
    }

    /// One reconcile pass over every object; returns whether anything is still in motion.
    async fn pass(&mut self, out: &Outputs) -> bool {
        let started = Instant::now();
        let now = Timestamp::now();
        let mut busy = false;
        let health = execute::health_by_cluster(&self.dataplane);
        let inflight = self.dataplane.inflight();
        // One list per provider for all clusters.
        let mut by_kind: HashMap<ProviderKind, Vec<Arc<BackendCluster>>> = HashMap::new();
        for t in self.tracked.values() {
            by_kind
                .entry(ProviderKind::of(&t.obj.spec.provider))
                .or_default()
                .push(Arc::new(t.obj.clone()));
        }
        let mut instances: HashMap<ClusterKey, Vec<Instance>> = HashMap::new();
        let mut list_errors: HashMap<ProviderKind, String> = HashMap::new();
        // A provider that had objects stays listed after its last one goes, so its orphans are
        // found (and a cluster that moved to another provider retires its old instances); one
        // never used is not called at all (no credentials needed for the demo).
        self.used_kinds.extend(by_kind.keys().copied());
        for kind in &self.used_kinds {
            by_kind.entry(*kind).or_default();
        }
        for (kind, clusters) in &by_kind {
            let Some(p) = self.providers.get(*kind) else {
                list_errors.insert(*kind, missing_provider(*kind));
                continue;
            };
            match p.list(clusters).await {
                Ok(list) => {
                    for i in list {
                        instances.entry(i.owner.clone()).or_default().push(i);
                    }
                }
                Err(e) => {
                    tracing::warn!(provider = %kind, %e, "listing instances failed");
                    list_errors.insert(*kind, e.to_string());
                }
            }
        }

        let empty = HashMap::new();
        let mut routes = Vec::new();
        let mut forget = Vec::new();
        // Instances of this install that no object owns: another UID under a tracked name, or
        // a name nothing tracks.
        let mut strays: Vec<Instance> = Vec::new();
        for (key, t) in self.tracked.iter_mut() {
            let kind = ProviderKind::of(&t.obj.spec.provider);
            let provider = self.providers.get(kind);
            let uid = t.obj.metadata.uid.clone().unwrap_or_default();
            let (mine, foreign): (Vec<Instance>, Vec<Instance>) = instances
                .remove(key)
                .unwrap_or_default()
                .into_iter()
                .partition(|i| i.belongs_to(&uid));
            strays.extend(foreign);
            if t.deleting {
                let listed = mine.iter().all(|i| !list_errors.contains_key(&i.provider))
                    && !list_errors.contains_key(&kind);
                let step = if listed {
                    execute::delete(
                        &mut t.obj,
                        &self.providers,
                        &mine,
                        Some(&inflight),
                        now,
                        execute::DeleteSettings {
                            drain: self.cfg.drain,
                            launch_visibility: self.cfg.launch_visibility,
                        },
                    )
                    .await
                } else {
                    Deletion::Waiting(format!(
                        "cannot list instances: {}",
                        list_errors.get(&kind).cloned().unwrap_or_default()
                    ))
                };
                match step {
                    Deletion::Done => {
                        tracing::info!(cluster = %key, "BackendCluster deleted");
                        forget.push(key.clone());
                    }
                    Deletion::Waiting(why) => {
                        execute::mark_deleting(&mut t.obj, &why, now);
                        busy = true;
                    }
                }
                continue;
            }
            let Some(provider) = provider.filter(|_| !list_errors.contains_key(&kind)) else {
                let why = list_errors.get(&kind).cloned().unwrap_or_default();
                let status = t.obj.status.get_or_insert_with(Default::default);
                set_condition(
                    &mut status.conditions,
                    "Ready",
                    false,
                    "ProviderError",
                    &why,
                    t.obj.metadata.generation,
                    now,
                );
                // Keep serving the endpoints we had.
                routes.push(route_config(key, &t.obj, execute::status_endpoints(&t.obj)));
                continue;
            };
            let applied = execute::apply(
                &t.obj,
                execute::Inputs {
                    provider: provider.as_ref(),
                    providers: &self.providers,
                    instances: &mine,
                    health: health.get(&key.to_string()).unwrap_or(&empty),
                    inflight: Some(&inflight),
                    draining: &mut t.draining,
                    drain: self.cfg.drain,
                    metrics: &self.metrics,
                    backoff: &mut t.backoff,
                    backoff_range: self.cfg.launch_backoff,
                },
                now,
                &|_| Box::pin(async { Ok(()) }),
            )
            .await;
            busy |= applied.busy;
            let mut status = applied.status;
            if let Some(r) = &t.rejected {
                set_condition(
                    &mut status.conditions,
                    "Degraded",
                    true,
                    "InvalidSpec",
                    &format!("edit rejected, still serving the previous spec: {r}"),
                    t.obj.metadata.generation,
                    now,
                );
            }
            routes.push(route_config(key, &t.obj, applied.endpoints));
            t.obj.status = Some(status);
        }
        strays.extend(instances.into_values().flatten());
        self.sweep_orphans(strays).await;
        for key in forget {
            execute::forget_cluster(&self.metrics, &key);
            self.tracked.remove(&key);
        }
        self.metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        out.routes.send_if_modified(|cur| {
            let next = RouteTable { routes };
            if *cur == next {
                false
            } else {
                *cur = next;
                true
            }
        });
        let _ = out.status.send(Bytes::from(self.status_json()));
        out.ready.send_if_modified(|r| !std::mem::replace(r, true));
        busy || self.tracked.values().any(|t| t.deleting)
    }

    /// Terminates live instances of this controller that no object owns, once older than the
    /// grace period (a launch whose object was deleted meanwhile, an object removed while
    /// fleetlb was down). Runs only after the directory has been read, so a restart never
    /// mistakes every instance for an orphan.
    async fn sweep_orphans(&mut self, strays: Vec<Instance>) {
        // While any file or document fails to load, the objects it defines are unknown here
        // and their instances would look like orphans: sweep nothing until it loads.
        if !self.loaded_once || !self.errors.is_empty() {
            return;
        }
        let mut by_kind: HashMap<ProviderKind, Vec<String>> = HashMap::new();
        for i in strays {
            let old = i
                .launched_at
                .elapsed()
                .is_ok_and(|age| age >= self.cfg.orphan_grace);
            if i.state.needs_terminate() && old {
                tracing::warn!(cluster = %i.owner, id = %i.id, uid = %i.owner_uid, "orphan instance: no BackendCluster owns it; terminating");
                by_kind.entry(i.provider).or_default().push(i.id);
            }
        }
        for (kind, ids) in by_kind {
            if let Some(p) = self.providers.get(kind)
                && p.manages_instances()
                && p.terminate(&ids).await.is_ok()
            {
                self.metrics.orphans_terminated.inc_by(ids.len() as u64);
            }
        }
    }

    fn status_json(&self) -> Vec<u8> {
        let clusters = self
            .tracked
            .values()
            .map(|t| ClusterView {
                file: Some(t.file.display().to_string()),
                rejected_edit: t.rejected.as_deref(),
                ..ClusterView::new(&t.obj, t.created.to_string(), t.deleting)
            })
            .collect();
        StatusView {
            clusters,
            errors: self.errors.iter().map(String::as_str).collect(),
        }
        .to_json()
    }
}

/// Why a provider is missing in this process, for the object's condition.
pub(crate) fn missing_provider(kind: ProviderKind) -> String {
    match kind {
        ProviderKind::Aws => "the aws provider needs a unique id for this install: start fleetlb with --controller-id (instances of other ids are never touched)".into(),
        _ => format!("the {kind} provider is not configured in this process"),
    }
}

/// The data plane's view of one BackendCluster.
pub fn route_config(
    key: &ClusterKey,
    bc: &BackendCluster,
    endpoints: Vec<fleetlb_dataplane::EndpointConfig>,
) -> RouteConfig {
    let spec = &bc.spec;
    let hc = &spec.health_check;
    let b = &spec.balancing;
    let od = &spec.outlier_detection;
    let secs = |s: u32| Duration::from_secs(u64::from(s));
    RouteConfig {
        cluster: key.to_string(),
        prefix: spec.route.clone(),
        balancing: BalancingConfig {
            policy: match b.policy {
                fleetlb_crds::Policy::PeakEwma => Policy::PeakEwma,
                fleetlb_crds::Policy::LowestLatency => Policy::LowestLatency,
                fleetlb_crds::Policy::LeastRequest => Policy::LeastRequest,
                fleetlb_crds::Policy::RoundRobin => Policy::RoundRobin,
            },
            decay: secs(b.decay_seconds),
            slow_start: secs(b.slow_start_seconds),
            max_share: f64::from(b.max_share_percent) / 100.0,
        },
        health: HealthConfig {
            path: hc.path.clone(),
            interval: secs(hc.interval_seconds),
            timeout: secs(hc.timeout_seconds),
            healthy_threshold: hc.healthy_threshold,
            unhealthy_threshold: hc.unhealthy_threshold,
        },
        outlier: OutlierConfig {
            consecutive_failures: od.consecutive_failures,
            latency_factor: f64::from(od.latency_factor),
            base_ejection: secs(od.base_ejection_seconds),
            max_ejection_percent: od.max_ejection_percent,
        },
        request_timeout: secs(spec.timeout_seconds),
        endpoints,
    }
}
