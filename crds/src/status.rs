//! `status`: what the controller observed and decided.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state, written by the controller.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendClusterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Instances that exist and are not terminating.
    #[serde(default)]
    pub replicas: i32,
    /// Instances that pass their health check.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector for the scale subresource (`fleetlb.dev/backendcluster=NAME`): instances are
    /// not pods, but an HPA or KEDA needs a non-empty selector to act on the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The provider in use (`aws`, `local`, `static`), for `kubectl get bc`'s PROVIDER column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The instance types and markets serving now, for `kubectl get bc`'s CAPACITY column:
    /// `3 x t3.micro spot, 1 x t3.micro on-demand` (EC2 instances only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<String>,
    /// `Ready`, `Progressing` and `Degraded`, following the Kubernetes API conventions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Every instance fleetlb knows for this cluster.
    #[serde(default)]
    pub instances: Vec<InstanceStatus>,
    /// Endpoints handed to the data plane, fastest first.
    #[serde(default)]
    pub endpoints: Vec<EndpointStatus>,
    /// The latest launch intent of each slot, written before the provider is asked to launch:
    /// a controller that crashes mid-launch repeats the same intent (same EC2 `ClientToken`)
    /// instead of launching a second instance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub launches: Vec<LaunchIntent>,
    /// The autoscaler's count and what it came from (with `spec.autoscaling`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
}

/// What the autoscaler decided and from what.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// The instance count the autoscaler wants.
    pub desired_replicas: u32,
    /// Requests in flight per instance, averaged over the stable window, summed over proxies.
    pub inflight_per_instance: f64,
    /// Requests per second per instance over the same window.
    pub requests_per_second_per_instance: f64,
    /// The in-flight target per instance.
    pub target_inflight_per_instance: u32,
    /// Whether the panic window rules (a burst: scale up only).
    pub panic: bool,
    /// When the count last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
}

/// One launch decided by the controller.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LaunchIntent {
    /// Slot (0..replicas).
    pub slot: u32,
    /// Launch attempt for the slot (a replacement is the next attempt).
    pub attempt: u32,
    /// Idempotency token sent with the launch (EC2 `ClientToken`).
    pub client_token: String,
    /// Subnet the launch goes to (`aws` with `subnetIds`): a function of slot and attempt, so a
    /// replayed launch carries the same parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_id: Option<String>,
    /// The instance the launch made, once the provider answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// When the intent was recorded: deletion waits (boundedly) for the provider to list the
    /// instances of recent launches before releasing the object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_at: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

/// One instance as the provider and the prober see it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    /// Provider id (`i-0123...`).
    pub id: String,
    /// `host:port` the data plane sends requests to, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Provider state: `pending`, `running`, `shutting-down`, `terminated`, ...
    pub state: String,
    /// Whether the instance passes its health check.
    pub healthy: bool,
    /// Latest latency estimate in milliseconds, when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// The provider that reports it (`aws`, `local`, `static`); after a change of
    /// `spec.provider`, the old provider's instances are retired through it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// EC2 instance type, as EC2 reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// EC2 market: `spot` or `on-demand`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_type: Option<String>,
    /// Availability zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

/// One endpoint of the ranked set the data plane receives.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointStatus {
    /// Instance id.
    pub id: String,
    /// `host:port`.
    pub address: String,
    /// Latency estimate in milliseconds, when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// Availability zone, when the provider reports one (zone-aware routing reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}
