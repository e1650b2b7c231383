//! The standalone driver: BackendClusters from YAML files in a directory, no Kubernetes.
//!
//! It behaves like the API server plus controller would: an edit that fails validation is
//! rejected (logged once, shown in `/status`) and the object keeps its last valid spec; a file
//! that stops parsing leaves its objects as they were; a removed document or file deletes its
//! objects (after terminating their instances under `deletionPolicy: Delete`). Objects have no
//! API-server UID here: each gets a stable one derived from its namespace and name, and its
//! creation time is when fleetlb first read it.
//!
//! Everything else is the [`Core`]'s, as in Kubernetes: each pass reconciles (or deletes)
//! every object, sweeps orphans, publishes the route table to the data plane and `/status`.
//! Events go to the log and to the object's `events` in `/status`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fleetlb_crds::{BackendCluster, BackendClusterStatus};
use fleetlb_dataplane::RouteTable;
use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::core::delete::Deletion;
use crate::core::inventory::kinds_of;
use crate::core::view::{ClusterView, StatusView};
use crate::core::{Core, Event, EventType, Failure, Next, Settings, Sink, routes};
use crate::files::{self, FileLoad};
use crate::provider::{ClusterKey, ProviderKind, fnv64};
use crate::reconcile::set_condition;

/// Standalone driver settings.
#[derive(Clone, Debug)]
pub struct StandaloneConfig {
    /// Directory of BackendCluster YAML files.
    pub dir: PathBuf,
    /// How often the directory is checked for changes (default 500 ms).
    pub poll: Duration,
    /// Reconcile period without changes (default 2 s).
    pub resync: Duration,
    /// The core's settings ([`Settings::standalone`]).
    pub core: Settings,
}

impl StandaloneConfig {
    /// Defaults for `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            poll: Duration::from_millis(500),
            resync: Duration::from_secs(2),
            core: Settings::standalone(),
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

/// Events kept per object in `/status`.
const EVENTS_KEPT: usize = 10;

struct Tracked {
    obj: BackendCluster,
    file: PathBuf,
    rejected: Option<String>,
    events: Vec<Event>,
}

/// What one reconcile of one object wrote: its status and Events.
#[derive(Default)]
struct Written {
    status: Mutex<Option<BackendClusterStatus>>,
    events: Mutex<Vec<Event>>,
}

impl Sink for Written {
    fn write_status<'a>(
        &'a self,
        _bc: &'a BackendCluster,
        status: BackendClusterStatus,
    ) -> BoxFuture<'a, Result<(), String>> {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
        async { Ok(()) }.boxed()
    }

    fn event<'a>(&'a self, bc: &'a BackendCluster, event: Event) -> BoxFuture<'a, ()> {
        let key = ClusterKey::of(bc);
        match event.type_ {
            EventType::Normal => {
                tracing::info!(cluster = %key, reason = event.reason, "{}", event.note)
            }
            EventType::Warning => {
                tracing::warn!(cluster = %key, reason = event.reason, "{}", event.note)
            }
        }
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
        async {}.boxed()
    }
}

impl Written {
    /// Moves what was written into `t`.
    fn into_tracked(self, t: &mut Tracked) {
        if let Some(status) = self.status.into_inner().unwrap_or_else(|p| p.into_inner()) {
            t.obj.status = Some(status);
        }
        for e in self.events.into_inner().unwrap_or_else(|p| p.into_inner()) {
            if t.events.len() == EVENTS_KEPT {
                t.events.remove(0);
            }
            t.events.push(e);
        }
    }
}

/// The standalone driver's state.
pub struct Standalone {
    cfg: StandaloneConfig,
    core: Core,
    tracked: BTreeMap<ClusterKey, Tracked>,
    errors: Vec<String>,
    logged: HashSet<String>,
    last_hash: Option<u64>,
    /// The directory's files as last read (a poll re-reads only changed ones).
    file_cache: files::FileCache,
    loaded_once: bool,
    /// Provider kinds any object has used since start: only those are swept (a provider no
    /// object ever used is never called, so the demo needs no AWS credentials even with a
    /// controller id, and a kind whose last object left is still swept).
    used_kinds: BTreeSet<ProviderKind>,
    /// The log said once that no object is valid.
    said_none_valid: bool,
}

/// See [`Standalone::run`].
const DUTY: u32 = 10;

impl Standalone {
    /// A driver over `cfg.dir`; `core` is built with `cfg.core`.
    pub fn new(
        cfg: StandaloneConfig,
        providers: crate::provider::Providers,
        dataplane: fleetlb_dataplane::Dataplane,
        metrics: crate::metrics::Metrics,
    ) -> Self {
        metrics.leader.set(1);
        Self {
            core: Core::new(providers, dataplane, metrics, cfg.core.clone()),
            cfg,
            tracked: BTreeMap::new(),
            errors: Vec::new(),
            logged: HashSet::new(),
            last_hash: None,
            file_cache: files::FileCache::default(),
            loaded_once: false,
            used_kinds: BTreeSet::new(),
            said_none_valid: false,
        }
    }

    /// The driver's own work (directory reads, passes) stays under a `1 / DUTY` share of a core
    /// however many objects there are: the next read or pass waits at least `DUTY` times as
    /// long as the last one took. Small directories are unaffected (their passes take
    /// milliseconds); 10 000 objects are looked at every few seconds instead of every 2 s.
    /// Runs until `shutdown` completes. Instances are left to the caller (the local provider's
    /// `shutdown` ends its children).
    pub async fn run(mut self, out: Outputs, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let notices = self.core.cfg.notices.clone();
        let mut next_pass = Instant::now();
        let mut next_sample = Instant::now();
        loop {
            if Instant::now() >= next_sample {
                // The autoscalers' readings, about once a second.
                self.core.sample().await;
                next_sample = Instant::now() + Duration::from_secs(1);
            }
            let read = Instant::now();
            let changed = self.load();
            let read_took = read.elapsed();
            if changed || Instant::now() >= next_pass || !self.loaded_once {
                let started = Instant::now();
                let busy = self.pass(&out).await;
                // While instances are launching or draining, look again soon; never sooner
                // than DUTY times what the pass took (thousands of objects).
                let wait = if busy {
                    self.cfg.poll.min(self.cfg.resync)
                } else {
                    self.cfg.resync
                };
                next_pass = Instant::now() + wait.max(started.elapsed() * DUTY);
            }
            let pause = self
                .cfg
                .poll
                .min(Duration::from_secs(1))
                .max(read_took * DUTY);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                // An instance named by the interruption queue leaves at once.
                () = notices.changed() => {
                    // A pass looks at every object; which ones are named does not matter.
                    notices.take_fresh();
                    next_pass = Instant::now();
                }
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
        let mut seen_order: i64 = 0;
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
                    (Ok(bc), Some(key)) => {
                        // Objects first read together are as old as their order in the
                        // directory (files by name, documents in order): the earlier one keeps
                        // a contested route, as it did before a restart.
                        seen_order += 1;
                        let at = now
                            .checked_add(k8s_openapi::jiff::SignedDuration::from_nanos(seen_order))
                            .unwrap_or(now);
                        self.upsert(key, bc, &load.path, at)
                    }
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
            if !present.contains(key) && t.obj.metadata.deletion_timestamp.is_none() {
                tracing::info!(cluster = %key, "BackendCluster removed from {}; deleting", t.file.display());
                t.obj.metadata.deletion_timestamp = Some(Time(now));
            }
        }
        self.report(errors);
    }

    fn upsert(&mut self, key: ClusterKey, mut bc: BackendCluster, file: &Path, now: Timestamp) {
        match self.tracked.get_mut(&key) {
            Some(t) => {
                t.rejected = None;
                t.file = file.to_path_buf();
                // Back before its deletion finished: it lives on.
                t.obj.metadata.deletion_timestamp = None;
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
                // When fleetlb first saw it: the older of two objects claiming one route keeps it.
                bc.metadata.creation_timestamp = Some(Time(now));
                tracing::info!(cluster = %key, route = %bc.spec.route, replicas = bc.spec.replicas, provider = %ProviderKind::of(&bc.spec.provider), "BackendCluster added");
                self.tracked.insert(
                    key,
                    Tracked {
                        obj: bc,
                        file: file.to_path_buf(),
                        rejected: None,
                        events: Vec::new(),
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
        self.core.refresh().await;
        let objects: Vec<Arc<BackendCluster>> = self
            .tracked
            .values()
            .map(|t| Arc::new(t.obj.clone()))
            .collect();
        let mut busy = false;
        let mut forget = Vec::new();
        // Dropped before `objects` (declared after it): the index never outlives its slice.
        let _index = self.core.index_routes(&objects);
        for (key, t) in self.tracked.iter_mut() {
            let written = Written::default();
            self.used_kinds.extend(kinds_of(&t.obj));
            if t.obj.metadata.deletion_timestamp.is_some() {
                match self.core.delete(&t.obj, &objects, &written).await {
                    Deletion::Done => forget.push(key.clone()),
                    Deletion::Waiting(_) => busy = true,
                    // Said in the condition; the next resync retries.
                    Deletion::Failed(_) => {}
                }
            } else {
                // Failures are in the conditions; the next pass retries (launches back off).
                busy |= matches!(
                    self.core.reconcile(&t.obj, &objects, &written).await,
                    Ok(Next::Busy) | Err(Failure::Launch(_))
                );
            }
            written.into_tracked(t);
            if let Some(r) = &t.rejected {
                let generation = t.obj.metadata.generation;
                let status = t.obj.status.get_or_insert_with(Default::default);
                set_condition(
                    &mut status.conditions,
                    "Degraded",
                    true,
                    crate::error::Reason::InvalidSpec.as_str(),
                    &format!("edit rejected, still serving the previous spec: {r}"),
                    generation,
                    Timestamp::now(),
                );
            }
        }
        // While any file or document fails to load, the objects it defines are unknown here
        // and their instances would look like orphans: sweep nothing until it loads.
        if self.loaded_once && self.errors.is_empty() {
            let uids: HashMap<ClusterKey, Option<String>> = self
                .tracked
                .iter()
                .map(|(k, t)| (k.clone(), t.obj.metadata.uid.clone()))
                .collect();
            let confirm = move |key: &ClusterKey| {
                let uid = uids.get(key).cloned().flatten();
                async move { Ok(uid) }.boxed()
            };
            self.core
                .sweep(&objects, Some(&self.used_kinds), &confirm)
                .await;
        }
        // The interruption messages whose instances are now going or gone are deleted; while
        // any waits, look again soon.
        self.core.settle_notices(&objects).await;
        busy |= !self.core.cfg.notices.is_empty();
        for key in forget {
            self.tracked.remove(&key);
        }
        self.core
            .metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        let objects: Vec<Arc<BackendCluster>> = self
            .tracked
            .values()
            .map(|t| Arc::new(t.obj.clone()))
            .collect();
        routes::publish(&out.routes, &objects);
        let _ = out.status.send(Bytes::from(self.status_json()));
        if self.tracked.is_empty() && !self.errors.is_empty() {
            // Nothing to serve, and not because the directory is empty: /readyz says why (from
            // the status document's errors) until a file is fixed.
            if !*out.ready.borrow() && !self.said_none_valid {
                self.said_none_valid = true;
                tracing::error!(
                    "no valid BackendCluster in {}: every object has a problem (listed above); /readyz answers 503 until one is fixed",
                    self.cfg.dir.display()
                );
            }
        } else {
            out.ready.send_if_modified(|r| !std::mem::replace(r, true));
        }
        busy
    }

    fn status_json(&self) -> Vec<u8> {
        let clusters = self
            .tracked
            .values()
            .map(|t| {
                let mut view = ClusterView::new(&t.obj);
                view.file = Some(t.file.display().to_string());
                view.rejected_edit = t.rejected.as_deref();
                view.events = &t.events;
                view
            })
            .collect();
        StatusView {
            clusters,
            errors: self.errors.iter().map(String::as_str).collect(),
        }
        .to_json()
    }
}
