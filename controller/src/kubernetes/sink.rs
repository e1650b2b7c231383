//! The Kubernetes [`Sink`]: status by server-side apply on `/status` (skipped when nothing
//! but latency figures changed within a resync period), Events as events.k8s.io Event objects.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use fleetlb_crds::{BackendCluster, BackendClusterStatus};
use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::events::v1::Event as KubeEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::Reporter;
use kube::{Client, Resource};
use tokio::time::Instant;

use super::{Context, MANAGER, locked};
use crate::core::{Event, EventType, Sink};

impl Sink for Context {
    fn write_status<'a>(
        &'a self,
        bc: &'a BackendCluster,
        status: BackendClusterStatus,
    ) -> BoxFuture<'a, Result<(), String>> {
        async move { self.apply_status(bc, status).await }.boxed()
    }

    fn event<'a>(&'a self, bc: &'a BackendCluster, event: Event) -> BoxFuture<'a, ()> {
        async move {
            if let Err(e) = self.events.publish(bc, &event).await {
                tracing::warn!(error = %e, reason = event.reason, "cannot publish an Event");
            }
        }
        .boxed()
    }
}

/// How long a published Event is remembered: the same Event again within it adds to the
/// first one's series (as kube-runtime's recorder and client-go's do) instead of a new object.
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// Publishes Events. Unlike kube-runtime's recorder, an Event is the same as an earlier one
/// only when its note is too: a `Launched` Event naming other instances is a new Event, not a
/// count on the first one (whose note would be all `kubectl get events` shows).
pub struct Events {
    client: Client,
    reporter: Reporter,
    /// (object UID, type, reason, note) -> (Event name, count, last sent).
    sent: Mutex<HashMap<SeriesKey, Sent>>,
}

/// What makes two Events one series: the object's UID, type, reason and note.
type SeriesKey = (String, EventType, &'static str, String);

struct Sent {
    name: String,
    count: i32,
    at: Instant,
}

impl Events {
    /// Events reported as `reporter`.
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self {
            client,
            reporter,
            sent: Mutex::default(),
        }
    }

    /// Creates an Event about `bc`, or counts one more of the same Event's series.
    pub async fn publish(&self, bc: &BackendCluster, event: &Event) -> Result<(), kube::Error> {
        let regarding = bc.object_ref(&());
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let key = (
            regarding.uid.clone().unwrap_or_default(),
            event.type_,
            event.reason,
            event.note.clone(),
        );
        let now = k8s_openapi::jiff::Timestamp::now();
        let api: Api<KubeEvent> = Api::namespaced(self.client.clone(), &namespace);
        let repeat = {
            let mut sent = locked(&self.sent);
            sent.retain(|_, s| s.at.elapsed() < SERIES_WINDOW);
            sent.get_mut(&key).map(|s| {
                s.count += 1;
                s.at = Instant::now();
                (s.name.clone(), s.count)
            })
        };
        if let Some((name, count)) = repeat {
            let patch = serde_json::json!({
                "series": {"count": count, "lastObservedTime": MicroTime(now)}
            });
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                // Gone (the API server's Event TTL): a new one below.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                other => return other.map(|_| ()),
            }
        }
        let object = KubeEvent {
            metadata: ObjectMeta {
                name: Some(event_name(&regarding.name.clone().unwrap_or_default(), now)),
                namespace: Some(namespace),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            action: Some(event.reason.into()),
            reason: Some(event.reason.into()),
            note: Some(event.note.clone()),
            type_: Some(
                match event.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            regarding: Some(regarding),
            reporting_controller: Some(self.reporter.controller.clone()),
            // The API server allows 128 bytes (an identity from a long hostname is cut).
            reporting_instance: self.reporter.instance.as_deref().map(|i| {
                let mut end = i.len().min(128);
                while !i.is_char_boundary(end) {
                    end -= 1;
                }
                i[..end].to_string()
            }),
            ..Default::default()
        };
        let created = api.create(&PostParams::default(), &object).await?;
        locked(&self.sent).insert(
            key,
            Sent {
                name: created.metadata.name.unwrap_or_default(),
                count: 1,
                at: Instant::now(),
            },
        );
        Ok(())
    }
}

/// `OBJECT.HEX`: unique per Event, a valid name whatever the object's name's length.
fn event_name(object: &str, now: k8s_openapi::jiff::Timestamp) -> String {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let mut base = object;
    if base.len() > 200 {
        base = base.get(..200).unwrap_or(base).trim_end_matches(['-', '.']);
    }
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{base}.{:x}{seq:x}", now.as_nanosecond())
}

impl Context {
    /// Writes `status` by server-side apply unless it equals the current one (latency figures
    /// aside, which are refreshed once per resync period rather than on every change). The
    /// write is conditional on the object's `resourceVersion`: a status decided from a stale
    /// copy of the object is refused (409) instead of overwriting a newer one, and the object
    /// is reconciled again from the fresh copy.
    async fn apply_status(
        &self,
        bc: &BackendCluster,
        status: fleetlb_crds::BackendClusterStatus,
    ) -> Result<(), String> {
        let uid = bc.metadata.uid.clone().unwrap_or_default();
        let seen = bc.metadata.resource_version.clone();
        let (unchanged, against) = match locked(&self.written).get(&uid) {
            Some(w) => (
                w.at.elapsed() < self.cfg.resync
                    && (same_status(&w.status, &status)
                        || bc.status.as_ref().is_some_and(|s| same_status(s, &status))),
                w.against(&seen),
            ),
            None => (false, seen.clone()),
        };
        if unchanged {
            return Ok(());
        }
        // A replica that lost the Lease while its reconcile ran must not overwrite what the
        // new leader wrote (its launch intents above all).
        if !self.is_leader() {
            return Err("this replica no longer holds the leader-election Lease".into());
        }
        let key = crate::provider::ClusterKey::of(bc);
        tracing::debug!(cluster = %key, seen = ?seen, against = ?against, "writing status");
        let api: Api<BackendCluster> = Api::namespaced(self.client.clone(), &key.namespace);
        let patch = serde_json::json!({
            "apiVersion": BackendCluster::api_version(&()),
            "kind": BackendCluster::kind(&()),
            "metadata": {"resourceVersion": against},
            "status": &status,
        });
        let written = api
            .patch_status(
                &key.name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(|e| match e {
                kube::Error::Api(s) if s.code == 409 => {
                    "the object changed since it was read (409 Conflict); reconciling it again"
                        .to_string()
                }
                e => format!("Kubernetes API: {e}"),
            })?;
        let mut all = locked(&self.written);
        let next = super::Written::after(all.get(&uid), seen, status, written);
        all.insert(uid, next);
        Ok(())
    }
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
        // The autoscaler's readings move every second; its count and panic state do not.
        if let Some(a) = s.autoscaling.as_mut() {
            a.inflight_per_instance = 0.0;
            a.requests_per_second_per_instance = 0.0;
        }
        s
    };
    strip(a) == strip(b)
}
