//! The Kubernetes [`Sink`]: status by server-side apply on `/status` (skipped when nothing
//! but latency figures changed within a resync period), Events as Event objects.

use fleetlb_crds::{BackendCluster, BackendClusterStatus};
use futures::FutureExt;
use futures::future::BoxFuture;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use tokio::time::Instant;

use super::{Context, MANAGER, locked};
use crate::core::{Event, Sink};
use crate::provider::ClusterKey;

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
            let ev = kube::runtime::events::Event {
                type_: match event.type_ {
                    crate::core::EventType::Normal => EventType::Normal,
                    crate::core::EventType::Warning => EventType::Warning,
                },
                reason: event.reason.into(),
                note: Some(event.note),
                action: event.reason.into(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&ev, &bc.object_ref(&())).await {
                tracing::warn!(error = %e, reason = event.reason, "cannot publish an Event");
            }
        }
        .boxed()
    }
}

impl Context {
    /// Writes `status` by server-side apply unless it equals the current one (latency figures
    /// aside, which are refreshed once per resync period rather than on every change).
    async fn apply_status(
        &self,
        bc: &BackendCluster,
        status: fleetlb_crds::BackendClusterStatus,
    ) -> Result<(), String> {
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
            return Err("this replica no longer holds the leader-election Lease".into());
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
        .await
        .map_err(|e| format!("Kubernetes API: {e}"))?;
        locked(&self.written).insert(key, (Instant::now(), status));
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
