//! The `/status` document (what `fleetlb status` prints), the same shape in every driver.

use fleetlb_crds::BackendCluster;
use serde::Serialize;

use super::Event;
use crate::provider::ProviderKind;
use crate::reconcile;

/// One cluster in `/status`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView<'a> {
    namespace: &'a str,
    name: &'a str,
    route: &'a str,
    instance_type: String,
    provider: ProviderKind,
    desired: usize,
    created: String,
    /// The file that defines it (standalone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    deleting: bool,
    /// Why the file's latest edit was rejected (standalone: the object keeps its last valid
    /// spec).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected_edit: Option<&'a str>,
    /// The latest Events, oldest first (standalone; in Kubernetes they are Event objects).
    #[serde(skip_serializing_if = "<[Event]>::is_empty")]
    pub events: &'a [Event],
    status: &'a Option<fleetlb_crds::BackendClusterStatus>,
}

impl<'a> ClusterView<'a> {
    /// The view of `obj`.
    pub fn new(obj: &'a BackendCluster) -> Self {
        Self {
            namespace: obj.metadata.namespace.as_deref().unwrap_or("default"),
            name: obj.metadata.name.as_deref().unwrap_or(""),
            route: &obj.spec.route,
            instance_type: obj.spec.instance_types_joined(),
            provider: ProviderKind::of(&obj.spec.provider),
            desired: reconcile::desired_replicas(obj),
            created: obj
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            file: None,
            deleting: obj.metadata.deletion_timestamp.is_some(),
            rejected_edit: None,
            events: &[],
            status: &obj.status,
        }
    }
}

/// The `/status` document.
#[derive(Serialize)]
pub struct StatusView<'a> {
    /// Every cluster.
    pub clusters: Vec<ClusterView<'a>>,
    /// Problems not tied to one object (files that do not parse).
    pub errors: Vec<&'a str>,
}

impl StatusView<'_> {
    /// Pretty JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}
