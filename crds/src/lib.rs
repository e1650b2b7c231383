#![forbid(unsafe_code)]
//! `BackendCluster` (group `fleetlb.dev`, version `v1alpha1`): the one API fleetlb users write.
//!
//! A BackendCluster says "keep `replicas` instances of `instanceType` behind the path prefix
//! `route`". The controller makes the instances exist through a provider (`aws`, `local` or
//! `static`) and the data plane balances requests across the healthy ones.
//!
//! This crate holds types only, no I/O: the CRD manifest (`fleetlb crd`) is generated from them,
//! and [`BackendCluster::validate`] checks an object against that generated schema and its CEL
//! rules, as the API server does, so the standalone driver (which has no API server) rejects
//! exactly the same objects, with the same rules written once.

mod provider;
mod status;
mod validate;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use provider::{AwsProvider, LocalProvider, ProviderSpec, StaticProvider, is_arm64};
pub use status::{
    AutoscalingStatus, BackendClusterStatus, EndpointStatus, InstanceStatus, LaunchIntent,
};
pub use validate::{FieldError, field_path, json_schema, schema_errors, validate_spec};

/// Desired state of a BackendCluster.
// `printcolumn(...)` repeats `type_ = ...`, which clippy reads as a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "fleetlb.dev",
    version = "v1alpha1",
    kind = "BackendCluster",
    namespaced,
    shortname = "bc",
    category = "fleetlb",
    status = "BackendClusterStatus",
    doc = "A fleet of instances behind one route of the fleetlb load balancer",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Route", type_ = "string", json_path = ".spec.route"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(
        name = "Autoscaled",
        type_ = "integer",
        json_path = ".status.autoscaling.desiredReplicas"
    ),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.instanceType"),
    printcolumn(name = "Provider", type_ = "string", json_path = ".status.provider"),
    printcolumn(name = "Capacity", type_ = "string", json_path = ".status.capacity"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.autoscaling) || !has(self.provider.static)",
    "message": "autoscaling does not apply to the static provider: its endpoints are listed, not launched",
    "fieldPath": ".autoscaling"
}, {
    "rule": "has(self.instanceType) != has(self.instanceTypes)",
    "message": "set instanceType or instanceTypes, exactly one",
    "fieldPath": ".instanceType"
}, {
    "rule": "!has(self.capacityType) || self.capacityType == 'on-demand' || has(self.provider.aws)",
    "message": "spot capacity needs the aws provider",
    "fieldPath": ".capacityType"
}, {
    "rule": "!has(self.instanceTypes) || !has(self.provider.aws) || has(self.provider.aws.arm64ImageId) || self.instanceTypes.all(t, t.matches('^(a1|p6e-gb[0-9a-z]*|[a-z]+[0-9]+[a-z]*g[a-z]*)[.]')) || self.instanceTypes.all(t, !t.matches('^(a1|p6e-gb[0-9a-z]*|[a-z]+[0-9]+[a-z]*g[a-z]*)[.]'))",
    "message": "lists arm64 (Graviton) and x86_64 types: set provider.aws.arm64ImageId, the AMI of the arm64 ones (imageId serves the others)",
    "fieldPath": ".instanceTypes"
}]))]
pub struct BackendClusterSpec {
    /// Path prefix served by this cluster, e.g. `/cluster1`. Matches the prefix itself and
    /// anything below it (`/cluster1/x`), never a longer sibling (`/cluster10`). The full path is
    /// forwarded to the instance unchanged.
    #[schemars(length(min = 1, max = 256), pattern(validate::ROUTE_PATTERN))]
    pub route: String,

    /// Hosts served besides the route, matched case-insensitively and without the port:
    /// exact names (`shop.example.com`) or one leading wildcard label (`*.example.com` matches
    /// `a.example.com`, not `example.com` or `a.b.example.com`). None: any host. A request goes
    /// to the rules of its exact host, else of a matching wildcard, else to those naming no
    /// host; within them, to the longest matching route.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 32),
        inner(length(min = 1, max = 253), pattern(validate::HOST_PATTERN)),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub hosts: Vec<String>,

    /// Share of the requests when several BackendClusters serve the same route and hosts
    /// (0-1000; each of them names one, or the younger is refused with `RouteConflict`): a
    /// canary, blue/green, two instance types side by side. Requests split by weight, then go
    /// to the fastest instance within the chosen cluster; a cluster with no healthy instance
    /// drops out of the split. Changing it takes effect at once, without failing a request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub weight: Option<u32>,

    /// Plain HTTP requests to this cluster get a 308 to the same URL on the HTTPS listener
    /// (`--tls-listen`; without one, no redirect). Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub https_redirect: bool,

    /// Number of instances to keep running (0-1000).
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// EC2 instance type (e.g. `t2.micro`); or `instanceTypes` for several. The `local`
    /// provider maps the size to a service-time and concurrency profile so small types answer
    /// slower than large ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 64), pattern(validate::INSTANCE_TYPE_PATTERN))]
    pub instance_type: Option<String>,

    /// Instance types in order of preference (1-10), instead of `instanceType`: in each zone
    /// the first with capacity is launched, the next when EC2 has none of it there (Karpenter's
    /// and EC2 Fleet's flexibility). The balancer sends each type the traffic its latency earns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(min = 1, max = 10),
        inner(length(min = 3, max = 64), pattern(validate::INSTANCE_TYPE_PATTERN)),
        extend("x-kubernetes-list-type" = "atomic")
    )]
    pub instance_types: Vec<String>,

    /// What the instances speak, as ALB's target-group protocol versions: `HTTP1` (default),
    /// `HTTP2` (HTTP/2 with prior knowledge, many requests per connection) or `GRPC` (HTTP/2
    /// with gRPC's trailers, statuses, deadlines and health service). Clients may use HTTP/1.1
    /// or HTTP/2 for the first two; gRPC needs HTTP/2 on both sides.
    #[serde(default, skip_serializing_if = "Protocol::is_default")]
    pub protocol: Protocol,

    /// Which EC2 market instances are bought in (`aws` provider): `on-demand` (default),
    /// `spot`, or `spot-then-on-demand` (in each zone spot first, then on-demand, before the
    /// next zone). Applies to launches from now on; running instances stay as they are.
    /// Spot instances can be reclaimed with two minutes' warning; the balancer's latency
    /// estimates and health checks keep traffic off those that go.
    #[serde(default, skip_serializing_if = "CapacityType::is_default")]
    pub capacity_type: CapacityType,

    /// TCP port the instance's HTTP server listens on (default 8000). The `local` provider picks
    /// a free loopback port instead.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// Where instances come from: exactly one of `aws`, `local`, `static`.
    pub provider: ProviderSpec,

    /// Active health check of every instance.
    #[serde(default)]
    pub health_check: HealthCheck,

    /// How requests are spread over healthy instances.
    #[serde(default)]
    pub balancing: Balancing,

    /// Passive ejection of instances that fail or lag behind the rest of the cluster.
    #[serde(default)]
    pub outlier_detection: OutlierDetection,

    /// Seconds an instance has to send response headers (1-3600, default 30); past it the client
    /// gets 504.
    #[serde(default = "default_timeout_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: u32,

    /// Timers for routes that need longer than the proxy's defaults (streaming, long polls,
    /// slow uploads). Absent: `timeoutSeconds` and the proxy's flags (docs/limits.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,

    /// What happens to the instances when the BackendCluster is deleted (default `Delete`).
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// Seconds an instance that leaves the endpoint set (scale-down, replacement, deletion) keeps
    /// running for the requests it is still serving (0-3600; default: `timeoutSeconds`, the
    /// longest a request may wait for its answer). Ends early once the instance has no request
    /// in flight. ALB's `deregistration_delay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub deregistration_delay_seconds: Option<u32>,

    /// How drifted and dead instances are replaced.
    #[serde(default)]
    pub rollout: Rollout,

    /// Autoscaling from the requests fleetlb's proxies measure. While set, fleetlb owns the
    /// instance count within [`minReplicas`, `maxReplicas`]; `replicas` (what `kubectl scale`
    /// sets) is a floor above `minReplicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
}

/// A route's own timers.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// Seconds an instance has to send response headers once the request is sent (1-86400);
    /// replaces `timeoutSeconds` for long polls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub head_seconds: Option<u32>,
    /// Longest gap, in seconds, in a request body from the client or a response body from an
    /// instance (1-86400; default: the proxy's `--client-body-timeout` and
    /// `--upstream-body-timeout`, 60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub body_idle_seconds: Option<u32>,
}

/// The autoscaler's settings (Knative's KPA: a stable window, a panic window of a tenth of it).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.minReplicas <= self.maxReplicas",
    "message": "minReplicas must not exceed maxReplicas",
    "fieldPath": ".minReplicas"
}]))]
pub struct Autoscaling {
    /// Fewest instances (1-1000: at zero no request would reach an instance to be measured).
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: u32,
    /// Most instances (1-1000).
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: u32,
    /// Requests in flight one instance should carry (1-10000, default 8).
    #[serde(default = "default_target_inflight")]
    #[schemars(range(min = 1, max = 10000))]
    pub target_inflight_per_instance: u32,
    /// Requests per second one instance should carry, as a second signal (the larger need
    /// wins; 1-1000000, optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub target_requests_per_second_per_instance: Option<u32>,
    /// Seconds of load averaged for steady-state decisions (6-3600, default 60); the panic
    /// window is a tenth of it.
    #[serde(default = "default_stable_window")]
    #[schemars(range(min = 6, max = 3600))]
    pub stable_window_seconds: u32,
    /// Seconds the load must stay low before the count goes down (0-3600, default 60).
    #[serde(default = "default_scale_down_delay")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_delay_seconds: u32,
    /// Most growth per decision, as a factor of the current count (1-1000, default 10).
    #[serde(default = "default_max_scale_up_rate")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_scale_up_rate: u32,
}

fn default_target_inflight() -> u32 {
    8
}
fn default_stable_window() -> u32 {
    60
}
fn default_scale_down_delay() -> u32 {
    60
}
fn default_max_scale_up_rate() -> u32 {
    10
}

/// The replacement budget (Deployment semantics, as percentages of `replicas`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rollout {
    /// Instances launched beyond `replicas` while replacing, as a percentage of `replicas`
    /// rounded up, at least one (0-100, default 25).
    #[serde(default = "default_max_surge")]
    #[schemars(range(min = 0, max = 100))]
    pub max_surge_percent: u32,
    /// Instances that may stop serving before their replacements pass health checks, as a
    /// percentage of `replicas` rounded down (0-100, default 0: replacements first).
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub max_unavailable_percent: u32,
}

fn default_max_surge() -> u32 {
    25
}

impl Default for Rollout {
    fn default() -> Self {
        Self {
            max_surge_percent: default_max_surge(),
            max_unavailable_percent: 0,
        }
    }
}

fn default_port() -> i32 {
    8000
}

fn default_timeout_seconds() -> u32 {
    30
}

/// Active health check, with ALB semantics and defaults scaled for fast feedback
/// (ALB: 30 s / 5 s / 5 / 2).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.timeoutSeconds) || !has(self.intervalSeconds) || self.timeoutSeconds <= self.intervalSeconds",
    "message": "timeoutSeconds must not exceed intervalSeconds",
    "fieldPath": ".timeoutSeconds"
}]))]
pub struct HealthCheck {
    /// HTTP path probed with GET; any 2xx passes (default `/health`). Not used by `GRPC`
    /// clusters, which are probed with `grpc.health.v1.Health/Check`.
    #[serde(default = "default_health_path")]
    #[schemars(length(min = 1, max = 1024), pattern(validate::HEALTH_PATH_PATTERN))]
    pub path: String,
    /// Seconds between probes (1-300, default 2).
    #[serde(default = "default_interval")]
    #[schemars(range(min = 1, max = 300))]
    pub interval_seconds: u32,
    /// Seconds before a probe counts as failed (1-120, default 1); must be below the interval.
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 1, max = 120))]
    pub timeout_seconds: u32,
    /// Consecutive passes before an instance receives traffic (2-10, default 2).
    #[serde(default = "default_healthy_threshold")]
    #[schemars(range(min = 2, max = 10))]
    pub healthy_threshold: u32,
    /// Consecutive failures before an instance stops receiving traffic (2-10, default 2).
    #[serde(default = "default_unhealthy_threshold")]
    #[schemars(range(min = 2, max = 10))]
    pub unhealthy_threshold: u32,
    /// `GRPC` clusters: the service named in `grpc.health.v1.Health/Check` (default empty: the
    /// server as a whole, as Kubernetes' gRPC probes ask). An instance passes when it answers
    /// `SERVING`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 256), pattern(validate::GRPC_SERVICE_PATTERN))]
    pub grpc_service: String,
}

fn default_health_path() -> String {
    "/health".into()
}
fn default_interval() -> u32 {
    2
}
fn default_timeout() -> u32 {
    1
}
fn default_healthy_threshold() -> u32 {
    2
}
fn default_unhealthy_threshold() -> u32 {
    2
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            path: default_health_path(),
            interval_seconds: default_interval(),
            timeout_seconds: default_timeout(),
            healthy_threshold: default_healthy_threshold(),
            unhealthy_threshold: default_unhealthy_threshold(),
            grpc_service: String::new(),
        }
    }
}

/// Load-balancing settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Balancing {
    /// Balancing policy (default `peak-ewma`).
    #[serde(default)]
    pub policy: Policy,
    /// Time constant, in seconds, over which the latency estimate forgets a slow response
    /// (1-600, default 10, linkerd's).
    #[serde(default = "default_decay")]
    #[schemars(range(min = 1, max = 600))]
    pub decay_seconds: u32,
    /// Seconds over which a new or recovered instance ramps up to its full share (0-900,
    /// default 5; 0 disables).
    #[serde(default = "default_slow_start")]
    #[schemars(range(min = 0, max = 900))]
    pub slow_start_seconds: u32,
    /// No instance holds more than this percentage of its fair share of the cluster's requests
    /// in flight (100-1000, default 200): the cap that keeps latency-aware policies from herding.
    #[serde(default = "default_max_share")]
    #[schemars(range(min = 100, max = 1000))]
    pub max_share_percent: u32,
}

fn default_decay() -> u32 {
    10
}
fn default_slow_start() -> u32 {
    5
}
fn default_max_share() -> u32 {
    200
}

impl Default for Balancing {
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            decay_seconds: default_decay(),
            slow_start_seconds: default_slow_start(),
            max_share_percent: default_max_share(),
        }
    }
}

/// Passive outlier detection (Envoy semantics, latency added).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive failed requests (5xx, 429, refused, reset, timeout) that eject an instance
    /// (0-100, default 5; 0 disables).
    #[serde(default = "default_consecutive_failures")]
    #[schemars(range(min = 0, max = 100))]
    pub consecutive_failures: u32,
    /// An instance whose mean latency over the last second exceeds this multiple of the
    /// cluster's median (and the median by 5 ms) is ejected (0-100, default 3; 0 disables).
    /// Needs 3 or more instances with traffic.
    #[serde(default = "default_latency_factor")]
    #[schemars(range(min = 0, max = 100))]
    pub latency_factor: u32,
    /// First ejection lasts this long; each further one lasts one more period (1-300, default 30,
    /// capped at 300 s).
    #[serde(default = "default_base_ejection")]
    #[schemars(range(min = 1, max = 300))]
    pub base_ejection_seconds: u32,
    /// At most this percentage of the cluster is ejected at once, and never fewer than one
    /// instance may be (0-100, default 50).
    #[serde(default = "default_max_ejection")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: u32,
}

fn default_consecutive_failures() -> u32 {
    5
}
fn default_latency_factor() -> u32 {
    3
}
fn default_base_ejection() -> u32 {
    30
}
fn default_max_ejection() -> u32 {
    50
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            latency_factor: default_latency_factor(),
            base_ejection_seconds: default_base_ejection(),
            max_ejection_percent: default_max_ejection(),
        }
    }
}

/// The EC2 market of a cluster's launches (Karpenter's `karpenter.sh/capacity-type`).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CapacityType {
    /// On-demand instances only.
    #[default]
    OnDemand,
    /// Spot instances only.
    Spot,
    /// Spot first; on-demand where spot has no capacity.
    SpotThenOnDemand,
}

impl CapacityType {
    /// The name as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            CapacityType::OnDemand => "on-demand",
            CapacityType::Spot => "spot",
            CapacityType::SpotThenOnDemand => "spot-then-on-demand",
        }
    }

    fn is_default(&self) -> bool {
        *self == CapacityType::OnDemand
    }
}

/// The protocol fleetlb speaks to a cluster's instances.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Protocol {
    /// HTTP/1.1 over pooled keep-alive connections.
    #[default]
    #[serde(rename = "HTTP1")]
    Http1,
    /// HTTP/2 with prior knowledge (h2c): each request is a stream on a shared connection.
    #[serde(rename = "HTTP2")]
    Http2,
    /// gRPC over HTTP/2: trailers both ways, `grpc-status` counted, `grpc-timeout` honoured,
    /// health checked with `grpc.health.v1.Health/Check`.
    #[serde(rename = "GRPC")]
    Grpc,
}

impl Protocol {
    /// The protocol's name as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "HTTP1",
            Protocol::Http2 => "HTTP2",
            Protocol::Grpc => "GRPC",
        }
    }

    fn is_default(&self) -> bool {
        *self == Protocol::Http1
    }
}

/// How the data plane picks an instance for each request.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Power of two choices over latency estimate x (in-flight + 1); never herds.
    #[default]
    PeakEwma,
    /// Always the instance with the lowest latency estimate (the original system's behaviour).
    LowestLatency,
    /// Power of two choices over in-flight requests.
    LeastRequest,
    /// Each healthy instance in turn.
    RoundRobin,
}

impl Policy {
    /// The policy's name as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::PeakEwma => "peak-ewma",
            Policy::LowestLatency => "lowest-latency",
            Policy::LeastRequest => "least-request",
            Policy::RoundRobin => "round-robin",
        }
    }
}

/// What deleting a BackendCluster does to its instances.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum DeletionPolicy {
    /// Terminate every instance, then release the object.
    #[default]
    Delete,
    /// Leave the instances running and drop fleetlb's ownership of them.
    Orphan,
}

impl BackendClusterSpec {
    /// The instance types to launch, in order of preference (`instanceTypes`, or the one
    /// `instanceType`).
    pub fn instance_types(&self) -> Vec<&str> {
        if self.instance_types.is_empty() {
            self.instance_type.as_deref().into_iter().collect()
        } else {
            self.instance_types.iter().map(String::as_str).collect()
        }
    }

    /// The types as one string (`t3.small,t3.medium`), for tables and notes.
    pub fn instance_types_joined(&self) -> String {
        self.instance_types().join(",")
    }

    /// Seconds an instance has to send response headers: `timeouts.headSeconds`, else
    /// `timeoutSeconds`.
    pub fn request_timeout_seconds(&self) -> u32 {
        self.timeouts
            .as_ref()
            .and_then(|t| t.head_seconds)
            .unwrap_or(self.timeout_seconds)
    }

    /// `deregistrationDelaySeconds`, or its default `timeoutSeconds`.
    pub fn deregistration_delay(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(
            self.deregistration_delay_seconds
                .unwrap_or_else(|| self.request_timeout_seconds()),
        ))
    }
}

impl BackendCluster {
    /// Checks the spec against the CRD schema and its CEL rules; see [`validate_spec`].
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        validate_spec(&self.spec)
    }
}

/// Reads one BackendCluster from its JSON form (what the API server and the YAML loader hold):
/// types, unknown fields and every rule of [`BackendCluster::validate`]. The error names the
/// field: `spec.replicas: must be between 0 and 1000, got 5000`.
pub fn from_json(json: serde_json::Value) -> Result<BackendCluster, String> {
    let bc = parse(json)?;
    if let Err(errors) = bc.validate() {
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        return Err(text.join("; "));
    }
    Ok(bc)
}

/// The types alone, the error naming the field.
fn parse(json: serde_json::Value) -> Result<BackendCluster, String> {
    serde_path_to_error::deserialize(json).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path.is_empty() || path == "." {
            inner
        } else {
            format!("{path}: {inner}")
        }
    })
}

/// A BackendCluster as an API server holds it, read by a binary that may be older or newer
/// than the CRD installed there.
#[derive(Clone, Debug)]
pub struct Lenient {
    /// The object, without the fields this binary does not know; an error (naming the field)
    /// when even so it does not fit the types.
    pub object: Result<BackendCluster, String>,
    /// The spec fields this binary does not know (`spec.futureField`): a newer CRD's. Unknown
    /// status fields (a newer binary's) are dropped silently.
    pub unknown: Vec<String>,
}

/// Reads a BackendCluster from the API server's JSON without ever failing as a whole: fields
/// this binary's schema does not declare are set aside and named (a newer CRD applied before a
/// rollout, or kept after a rollback), so that one such object cannot stop every other from
/// being read. No validation beyond the types (see [`from_json`] for that).
pub fn from_json_lenient(mut json: serde_json::Value) -> Lenient {
    let unknown = strip_unknown_fields(&mut json);
    Lenient {
        object: parse(json),
        unknown,
    }
}

/// Removes from `json` the fields the CRD's schema does not declare and returns the paths of
/// those under `spec`.
fn strip_unknown_fields(json: &mut serde_json::Value) -> Vec<String> {
    use serde_json::Value;
    static SCHEMA: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    let schema = SCHEMA.get_or_init(|| {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(BackendCluster::crd()).unwrap_or_default();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    });
    fn walk(schema: &Value, v: &mut Value, path: &str, out: &mut Vec<String>) {
        if schema["x-kubernetes-preserve-unknown-fields"] == true {
            return;
        }
        match v {
            Value::Object(map) => {
                if let Some(props) = schema["properties"].as_object() {
                    map.retain(|k, _| {
                        let known = props.contains_key(k);
                        if !known {
                            out.push(format!("{path}.{k}"));
                        }
                        known
                    });
                    for (k, child) in map.iter_mut() {
                        walk(&props[k], child, &format!("{path}.{k}"), out);
                    }
                } else if let Some(each) =
                    schema.get("additionalProperties").filter(|a| a.is_object())
                {
                    for (k, child) in map.iter_mut() {
                        walk(each, child, &format!("{path}.{k}"), out);
                    }
                }
            }
            Value::Array(items) => {
                if let Some(each) = schema.get("items") {
                    for (i, child) in items.iter_mut().enumerate() {
                        walk(each, child, &format!("{path}[{i}]"), out);
                    }
                }
            }
            _ => {}
        }
    }
    let mut spec = Vec::new();
    if let Some(v) = json.get_mut("spec") {
        walk(&schema["properties"]["spec"], v, "spec", &mut spec);
    }
    if let Some(v) = json.get_mut("status") {
        walk(
            &schema["properties"]["status"],
            v,
            "status",
            &mut Vec::new(),
        );
    }
    spec
}

/// The CRD manifest as YAML, exactly as `manifests/crd.yaml` holds it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = BackendCluster::crd();
    let body = serde_yaml_ng::to_string(&crd).unwrap_or_default();
    format!("# Generated by `fleetlb crd`; do not edit.\n---\n{body}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn committed_crd_matches_the_types() {
        let committed = include_str!("../../manifests/crd.yaml");
        assert!(
            committed == crd_yaml(),
            "manifests/crd.yaml is stale: run `cargo run -- crd > manifests/crd.yaml`"
        );
    }

    #[test]
    fn fields_of_a_newer_crd_are_named_and_set_aside_not_fatal() {
        let json = serde_json::json!({
            "apiVersion": "fleetlb.dev/v1alpha1",
            "kind": "BackendCluster",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "route": "/web",
                "replicas": 2,
                "instanceType": "t2.micro",
                "futureField": "x",
                "provider": {"local": {"futureKnob": 1}},
            },
            "status": {"replicas": 2, "futureStatus": {"a": 1}},
        });
        let read = from_json_lenient(json.clone());
        assert_eq!(
            read.unknown,
            ["spec.futureField", "spec.provider.local.futureKnob"]
        );
        let bc = read.object.expect("the known fields read");
        assert_eq!(bc.spec.replicas, 2);
        assert_eq!(bc.status.map(|s| s.replicas), Some(2));
        // The strict reader (files, `fleetlb validate`) refuses the same object, naming a field.
        let err = from_json(json).unwrap_err();
        assert!(
            err.contains("futureField") || err.contains("futureKnob"),
            "{err}"
        );
        // A field whose type changed is an error naming it, not a failure of the whole read.
        let read = from_json_lenient(serde_json::json!({
            "apiVersion": "fleetlb.dev/v1alpha1", "kind": "BackendCluster",
            "metadata": {"name": "web"},
            "spec": {"route": "/web", "replicas": "two", "instanceType": "t2.micro", "provider": {"local": {}}},
        }));
        assert!(read.object.unwrap_err().starts_with("spec.replicas"));
    }

    #[test]
    fn crd_has_scale_subresource_and_columns() {
        let yaml = crd_yaml();
        for needle in [
            "specReplicasPath: .spec.replicas",
            "shortNames:\n    - bc",
            "name: Route",
            "name: Ready",
            "maximum: 1000",
            "rule: '!has(self.timeoutSeconds) || !has(self.intervalSeconds) || self.timeoutSeconds <= self.intervalSeconds'",
        ] {
            assert!(yaml.contains(needle), "CRD lacks {needle:?}:\n{yaml}");
        }
        // `kubectl get bc` columns, in order.
        let crd = BackendCluster::crd();
        let columns: Vec<&str> = crd.spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            [
                "Route",
                "Desired",
                "Autoscaled",
                "Ready",
                "Type",
                "Provider",
                "Capacity",
                "Reason",
                "Age"
            ]
        );
    }
}
