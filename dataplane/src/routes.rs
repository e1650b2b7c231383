//! The route table the controller hands the data plane over `tokio::sync::watch`.
//!
//! A [`RouteTable`] is a complete snapshot: every route with its policy, health check and ranked
//! endpoint set. The data plane diffs consecutive snapshots, so endpoints that stay keep their
//! latency estimates, health and in-flight counts, and requests in flight are never dropped.

use std::net::SocketAddr;
use std::time::Duration;

/// Every route the data plane serves, as one immutable snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteTable {
    /// Routes in any order; the data plane matches the longest prefix.
    pub routes: Vec<RouteConfig>,
}

/// One path prefix and the cluster behind it.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteConfig {
    /// Cluster name used in metrics and logs (`namespace/name`, or `name` in the default namespace).
    pub cluster: String,
    /// Path prefix (`/cluster1`); matches itself and `/cluster1/...`, not `/cluster10`.
    pub prefix: String,
    /// Hosts served: exact names or `*.example.com` (one leading label); empty: any host.
    /// Case, a port and a trailing dot are ignored.
    pub hosts: Vec<String>,
    /// Share of requests when several clusters serve the same host and prefix (each names a
    /// weight; a cluster with no healthy endpoint drops out of the split). `None`: not split.
    pub weight: Option<u32>,
    /// Plain HTTP requests get a 308 to the same URL on HTTPS (when the proxy has an HTTPS
    /// listener).
    pub https_redirect: bool,
    /// What the endpoints speak.
    pub protocol: Protocol,
    /// How requests are spread over the endpoints.
    pub balancing: BalancingConfig,
    /// Active health check settings.
    pub health: HealthConfig,
    /// Passive ejection settings.
    pub outlier: OutlierConfig,
    /// Time allowed for upstream response headers; past it the client gets 504.
    pub request_timeout: Duration,
    /// Longest gap in a request or response body on this route (`spec.timeouts.bodyIdleSeconds`);
    /// `None`: the proxy's `--client-body-timeout` and `--upstream-body-timeout`.
    pub body_timeout: Option<Duration>,
    /// Endpoints, best first (the controller's ranking; the balancer keeps its own live estimates).
    pub endpoints: Vec<EndpointConfig>,
}

/// One upstream instance.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EndpointConfig {
    /// Instance id (`i-0abc...`), used in logs and `/debug/endpoints`.
    pub id: String,
    /// Where requests go.
    pub addr: SocketAddr,
    /// Its availability zone, when known (EC2's placement), for zone-aware routing.
    pub zone: Option<String>,
}

impl EndpointConfig {
    /// An endpoint in no particular zone.
    pub fn new(id: impl Into<String>, addr: SocketAddr) -> Self {
        Self {
            id: id.into(),
            addr,
            zone: None,
        }
    }
}

/// What a cluster's endpoints speak (`fleetlb_crds::Protocol`, ALB's protocol versions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/1.1 over pooled keep-alive connections.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge: requests are streams on shared connections.
    Http2,
    /// gRPC over HTTP/2: trailers, `grpc-status`, `grpc-timeout`, the gRPC health service.
    Grpc,
}

impl Protocol {
    /// Whether requests go out as HTTP/2 streams.
    pub fn is_h2(self) -> bool {
        self != Protocol::Http1
    }
}

/// Balancing policy, see `fleetlb_crds::Policy` for the user-facing description.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    /// Power of two choices over peak-EWMA latency x (in-flight + 1).
    #[default]
    PeakEwma,
    /// The endpoint with the lowest latency estimate (the original system).
    LowestLatency,
    /// Power of two choices over in-flight requests.
    LeastRequest,
    /// Each eligible endpoint in turn.
    RoundRobin,
}

impl Policy {
    /// Name as used in YAML and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::PeakEwma => "peak-ewma",
            Policy::LowestLatency => "lowest-latency",
            Policy::LeastRequest => "least-request",
            Policy::RoundRobin => "round-robin",
        }
    }
}

/// Balancing settings of one route.
#[derive(Clone, Debug, PartialEq)]
pub struct BalancingConfig {
    /// The policy.
    pub policy: Policy,
    /// Peak-EWMA decay time constant (default 10 s).
    pub decay: Duration,
    /// Ramp-up time of new or recovered endpoints (default 5 s; zero disables).
    pub slow_start: Duration,
    /// Cap on an endpoint's in-flight requests as a multiple of its fair share (default 2.0).
    pub max_share: f64,
}

impl Default for BalancingConfig {
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            decay: Duration::from_secs(10),
            slow_start: Duration::from_secs(5),
            max_share: 2.0,
        }
    }
}

/// Passive outlier detection of one route.
#[derive(Clone, Debug, PartialEq)]
pub struct OutlierConfig {
    /// Consecutive failures that eject an endpoint (0 disables).
    pub consecutive_failures: u32,
    /// Mean latency over the last second above this multiple of the cluster's median ejects an
    /// endpoint (0 disables).
    pub latency_factor: f64,
    /// First ejection period; the n-th lasts n periods, at most 300 s.
    pub base_ejection: Duration,
    /// Most of the cluster that may be ejected at once, in percent (at least one endpoint may).
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            latency_factor: 3.0,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 50,
        }
    }
}

impl RouteConfig {
    /// A route with default settings, for tests and simple embeddings.
    pub fn new(cluster: &str, prefix: &str, endpoints: Vec<EndpointConfig>) -> Self {
        Self {
            cluster: cluster.into(),
            prefix: prefix.into(),
            hosts: Vec::new(),
            weight: None,
            https_redirect: false,
            protocol: Protocol::default(),
            balancing: BalancingConfig::default(),
            health: HealthConfig::default(),
            outlier: OutlierConfig::default(),
            request_timeout: Duration::from_secs(30),
            body_timeout: None,
            endpoints,
        }
    }
}

/// Active health check (ALB semantics: a 2xx within `timeout` passes; `healthy_threshold`
/// consecutive passes admit an endpoint, `unhealthy_threshold` consecutive failures remove it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    /// Path probed with GET (HTTP/1.1 and HTTP/2 clusters).
    pub path: String,
    /// Service asked about by `grpc.health.v1.Health/Check` (gRPC clusters; empty: the
    /// whole server).
    pub grpc_service: String,
    /// Time between probes of one endpoint.
    pub interval: Duration,
    /// Time after which a probe fails.
    pub timeout: Duration,
    /// Consecutive passes to become healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures to become unhealthy.
    pub unhealthy_threshold: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            path: "/health".into(),
            grpc_service: String::new(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 2,
        }
    }
}

/// Whether `path` falls under `prefix`: equal, or followed by `/` or nothing else.
/// `/` matches every path.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return path.starts_with('/');
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_matches;

    #[test]
    fn prefix_is_segment_aligned() {
        assert!(prefix_matches("/cluster1", "/cluster1"));
        assert!(prefix_matches("/cluster1", "/cluster1/"));
        assert!(prefix_matches("/cluster1", "/cluster1/a/b"));
        assert!(!prefix_matches("/cluster1", "/cluster10"));
        assert!(!prefix_matches("/cluster1", "/cluster"));
        assert!(!prefix_matches("/cluster1", "/x/cluster1"));
        assert!(prefix_matches("/", "/anything"));
    }
}
