//! BackendClusters as the controller watches them: read leniently, so that one object this
//! binary cannot fully read (a field of a newer CRD, applied before a rollout or kept after a
//! rollback) is set aside with a condition saying why, instead of failing the whole list and
//! stopping every other object.

use std::borrow::Cow;
use std::sync::Arc;

use fleetlb_crds::BackendCluster;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One watched BackendCluster.
#[derive(Clone, Debug)]
pub struct Watched {
    /// The object's metadata (also when its spec cannot be read).
    pub meta: ObjectMeta,
    /// The object without the fields this binary does not know, or why it cannot be read.
    pub object: Result<Arc<BackendCluster>, String>,
    /// Spec fields this binary does not know (`spec.futureField`).
    pub unknown: Vec<String>,
    /// `status.conditions` as the API server holds them (to set one without losing the
    /// others when the rest cannot be read).
    pub conditions: serde_json::Value,
}

impl Watched {
    /// The object, when this binary can act on it: readable, and no field it does not know.
    pub fn actionable(&self) -> Option<&Arc<BackendCluster>> {
        self.object
            .as_ref()
            .ok()
            .filter(|_| self.unknown.is_empty())
    }

    /// Why this binary will not act on the object: the reason and message of its condition.
    pub fn refusal(&self) -> Option<(&'static str, String)> {
        match &self.object {
            Err(e) => Some((
                "Unreadable",
                format!(
                    "this fleetlb cannot read the object ({e}); it is left as it is until a fleetlb that can takes over"
                ),
            )),
            Ok(_) if !self.unknown.is_empty() => Some((
                "UnknownFields",
                format!(
                    "this fleetlb does not know {} (a newer CRD's); the object is left as it is (no launch, no termination) until a fleetlb that knows them takes over",
                    self.unknown.join(", ")
                ),
            )),
            Ok(_) => None,
        }
    }
}

impl From<BackendCluster> for Watched {
    fn from(bc: BackendCluster) -> Self {
        Self {
            meta: bc.metadata.clone(),
            conditions: serde_json::to_value(bc.status.as_ref().map(|s| &s.conditions))
                .unwrap_or_default(),
            object: Ok(Arc::new(bc)),
            unknown: Vec::new(),
        }
    }
}

impl<'de> Deserialize<'de> for Watched {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let json = serde_json::Value::deserialize(d)?;
        let meta: ObjectMeta =
            serde_json::from_value(json["metadata"].clone()).map_err(serde::de::Error::custom)?;
        let conditions = json["status"]["conditions"].clone();
        let read = fleetlb_crds::from_json_lenient(json);
        Ok(Self {
            meta,
            object: read.object.map(Arc::new),
            unknown: read.unknown,
            conditions,
        })
    }
}

impl Serialize for Watched {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.object {
            Ok(bc) => bc.serialize(s),
            Err(_) => serde_json::json!({
                "apiVersion": BackendCluster::api_version(&()),
                "kind": BackendCluster::kind(&()),
                "metadata": &self.meta,
            })
            .serialize(s),
        }
    }
}

impl Resource for Watched {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        BackendCluster::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        BackendCluster::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        BackendCluster::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        BackendCluster::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
    }
}
