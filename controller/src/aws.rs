//! The `aws` provider: EC2 instances through aws-sdk-ec2.
//!
//! - **Ownership by tag, at creation**: every instance, volume and network interface is launched
//!   with `TagSpecifications` carrying `fleetlb.dev/controller` (this install), namespace, name, object UID, slot, attempt,
//!   spec hash and port, plus the user's tags — never tagged after the fact.
//! - **One DescribeInstances for all clusters per pass**, filtered by the controller tag and by
//!   every non-terminated state, paginated.
//! - **Crash-safe launches**: the `ClientToken` is derived from (UID, slot, spec hash, attempt),
//!   all of which are recomputed from EC2's own tags after a restart, so a repeated launch intent
//!   is the same token and EC2 returns the instance it already made instead of a second one. If
//!   EC2 answers a token with an instance that is already gone, the next attempt number is used.
//! - **Replays are the same launch**: the subnet is a function of (slot, attempt), so a repeated
//!   `ClientToken` always carries the same `SubnetId` (EC2 answers a repeat with other
//!   parameters `IdempotentParameterMismatch`, which fleetlb reads as "already launched, wait for
//!   DescribeInstances to show it", never as a failure).
//! - **Capacity**: `InsufficientInstanceCapacity` marks that (instance type, subnet) unavailable
//!   for three minutes and the launch moves on to the next attempt, which is the next subnet.
//! - Instances require IMDSv2. Without `userData`, a small bootstrap serves an HTTP app like the
//!   original FastAPI one on `spec.port`. User data is never logged.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    Filter, HttpTokensState, IamInstanceProfileSpecification, InstanceMetadataOptionsRequest,
    InstanceStateName, InstanceType, ResourceType, Tag, TagSpecification,
};
use fleetlb_crds::{BackendCluster, ProviderSpec};
use futures::FutureExt;
use futures::future::BoxFuture;

use crate::Error;
use crate::metrics::Metrics;
use crate::provider::{
    ClusterKey, Instance, InstanceState, Launch, LaunchRequest, LaunchedAs, Provider, ProviderKind,
    subnet_for,
};

/// Tag keys fleetlb puts on every instance.
pub mod tags {
    /// The controller install that owns the instance.
    pub const CONTROLLER: &str = "fleetlb.dev/controller";
    /// Owner namespace.
    pub const NAMESPACE: &str = "fleetlb.dev/namespace";
    /// Owner name.
    pub const NAME: &str = "fleetlb.dev/name";
    /// Owner UID.
    pub const UID: &str = "fleetlb.dev/uid";
    /// Slot.
    pub const SLOT: &str = "fleetlb.dev/slot";
    /// Launch attempt for the slot.
    pub const ATTEMPT: &str = "fleetlb.dev/attempt";
    /// Spec hash.
    pub const SPEC_HASH: &str = "fleetlb.dev/spec-hash";
    /// Port the instance serves on.
    pub const PORT: &str = "fleetlb.dev/port";
}

/// The EC2 API operations fleetlb calls, for the IAM policy check.
pub const EC2_OPERATIONS: &[&str] = &[
    "DescribeInstances",
    "RunInstances",
    "TerminateInstances",
    "DeleteTags",
];

/// How long an (instance type, subnet) stays unavailable after `InsufficientInstanceCapacity`.
const CAPACITY_BACKOFF: Duration = Duration::from_secs(180);

/// A client-side rate limit for one EC2 API (client-go's QPS and burst): a token bucket that
/// makes callers wait rather than send faster than EC2's own per-API buckets refill, so a burst
/// of reconciles (a controller restart with many objects) does not end in throttling.
struct RateLimit {
    per_second: f64,
    burst: f64,
    state: Mutex<(f64, tokio::time::Instant)>,
}

impl RateLimit {
    fn new(per_second: f64, burst: f64) -> Self {
        Self {
            per_second,
            burst,
            state: Mutex::new((burst, tokio::time::Instant::now())),
        }
    }

    /// Waits for a token.
    async fn acquire(&self) {
        let wait = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let (tokens, at) = &mut *st;
            let now = tokio::time::Instant::now();
            *tokens =
                (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
            *at = now;
            *tokens -= 1.0;
            if *tokens >= 0.0 {
                return;
            }
            Duration::from_secs_f64(-*tokens / self.per_second)
        };
        tokio::time::sleep(wait).await;
    }
}

/// One SDK client and rate limit per EC2 API fleetlb calls. The SDK retries throttled and 5xx
/// calls itself (standard mode: 3 attempts, jittered exponential backoff); the drivers back off
/// per object beyond that. Separate retry partitions keep a throttled `RunInstances` from
/// draining the retry budget of the `DescribeInstances` every reconcile needs.
struct Clients {
    describe: Api,
    run: Api,
    terminate: Api,
    tags: Api,
}

/// The client and rate limit of one EC2 API.
struct Api {
    client: aws_sdk_ec2::Client,
    limit: RateLimit,
}

impl Api {
    /// The client, once the rate limit lets a call through.
    async fn ready(&self) -> &aws_sdk_ec2::Client {
        self.limit.acquire().await;
        &self.client
    }
}

/// How long EC2 calls may take: a hung endpoint fails the call (and is retried) instead of
/// stalling reconciles forever.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// TCP/TLS connect (default 3 s).
    pub connect: Duration,
    /// One attempt (default 20 s).
    pub attempt: Duration,
    /// The whole call with its retries (default 60 s).
    pub operation: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(3),
            attempt: Duration::from_secs(20),
            operation: Duration::from_secs(60),
        }
    }
}

/// Refuses every attempt (retries included) of a mutating EC2 call unless this replica leads at
/// the moment the request would be sent: the last check before the wire, so a replica that lost
/// the Lease while a call waited for the rate limit or between SDK retries sends nothing.
#[derive(Debug)]
struct LeaderGate(tokio::sync::watch::Receiver<bool>);

impl aws_sdk_ec2::config::Intercept for LeaderGate {
    fn name(&self) -> &'static str {
        "fleetlb-leader-gate"
    }

    fn read_before_transmit(
        &self,
        _context: &aws_sdk_ec2::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &aws_sdk_ec2::config::RuntimeComponents,
        _cfg: &mut aws_sdk_ec2::config::ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if *self.0.borrow() {
            Ok(())
        } else {
            Err("NotLeader: this replica no longer holds the leader-election Lease".into())
        }
    }
}

impl Clients {
    fn new(
        conf: &aws_config::SdkConfig,
        t: Timeouts,
        leader: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Self {
        // Rates well under EC2's default refill rates (non-mutating 20/s, RunInstances 2/s
        // with a large bucket, TerminateInstances 5/s), bursts of 20.
        let api = |partition: &'static str, per_second: f64, mutating: bool| {
            let mut b = aws_sdk_ec2::config::Builder::from(conf);
            if mutating && let Some(l) = &leader {
                b = b.interceptor(LeaderGate(l.clone()));
            }
            let c = b
                .timeout_config(
                    aws_sdk_ec2::config::timeout::TimeoutConfig::builder()
                        .connect_timeout(t.connect)
                        .operation_attempt_timeout(t.attempt)
                        .operation_timeout(t.operation)
                        .build(),
                )
                .retry_partition(aws_sdk_ec2::config::retry::RetryPartition::new(partition))
                .retry_config(
                    aws_sdk_ec2::config::retry::RetryConfig::standard()
                        .with_max_attempts(3)
                        .with_initial_backoff(Duration::from_millis(200))
                        .with_max_backoff(Duration::from_secs(5)),
                )
                .build();
            Api {
                client: aws_sdk_ec2::Client::from_conf(c),
                limit: RateLimit::new(per_second, 20.0),
            }
        };
        Self {
            describe: api("fleetlb-ec2-describe", 10.0, false),
            run: api("fleetlb-ec2-run", 2.0, true),
            terminate: api("fleetlb-ec2-terminate", 5.0, true),
            tags: api("fleetlb-ec2-tags", 5.0, true),
        }
    }
}

/// EC2 through aws-sdk-ec2.
pub struct AwsProvider {
    client: Clients,
    controller_id: String,
    metrics: Metrics,
    no_capacity: Mutex<HashMap<(String, String), Instant>>,
}

impl AwsProvider {
    /// A provider using `conf` (region, credentials, endpoint), owning instances tagged with
    /// `controller_id`.
    pub fn new(conf: &aws_config::SdkConfig, controller_id: String, metrics: Metrics) -> Self {
        Self::with_timeouts(conf, controller_id, metrics, Timeouts::default())
    }

    /// [`AwsProvider::new`] with other call timeouts.
    pub fn with_timeouts(
        conf: &aws_config::SdkConfig,
        controller_id: String,
        metrics: Metrics,
        timeouts: Timeouts,
    ) -> Self {
        Self::with_options(conf, controller_id, metrics, timeouts, None)
    }

    /// [`AwsProvider::with_timeouts`], sending `RunInstances`, `TerminateInstances` and
    /// `DeleteTags` (every attempt, retries included) only while `leader` is true.
    pub fn with_options(
        conf: &aws_config::SdkConfig,
        controller_id: String,
        metrics: Metrics,
        timeouts: Timeouts,
        leader: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Self {
        Self {
            client: Clients::new(conf, timeouts, leader),
            controller_id,
            metrics,
            no_capacity: Mutex::new(HashMap::new()),
        }
    }

    /// The standard AWS configuration chain (environment, profile, IMDS, IRSA), with
    /// `endpoint` overriding the EC2 endpoint (`AWS_ENDPOINT_URL` works too).
    pub async fn from_env(
        endpoint: Option<String>,
        controller_id: String,
        metrics: Metrics,
        leader: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Self {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(url) = endpoint {
            loader = loader.endpoint_url(url);
        }
        Self::with_options(
            &loader.load().await,
            controller_id,
            metrics,
            Timeouts::default(),
            leader,
        )
    }

    fn count<T, E: ProvideErrorMetadata>(&self, op: &str, r: &Result<T, E>) {
        let code = match r {
            Ok(_) => "ok",
            Err(e) => e.code().unwrap_or("dispatch"),
        };
        self.metrics
            .ec2_requests
            .with_label_values(&[op, code])
            .inc();
    }

    fn fail<E: ProvideErrorMetadata + std::error::Error>(op: &'static str, e: &E) -> Error {
        Error::Provider {
            provider: "aws",
            operation: op,
            message: match (e.code(), e.message()) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c.to_string(),
                // Timeouts, connection failures: the error chain, readable.
                _ => aws_smithy_types::error::display::DisplayErrorContext(e).to_string(),
            },
        }
    }

    fn capacity_ok(&self, instance_type: &str, subnet: &str) -> bool {
        let mut map = self.no_capacity.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, since| since.elapsed() < CAPACITY_BACKOFF);
        !map.contains_key(&(instance_type.to_string(), subnet.to_string()))
    }

    fn mark_no_capacity(&self, instance_type: &str, subnet: &str) {
        let mut map = self.no_capacity.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(
            (instance_type.to_string(), subnet.to_string()),
            Instant::now(),
        );
    }

    async fn run_one(
        &self,
        req: &LaunchRequest,
        aws: &fleetlb_crds::AwsProvider,
        subnet: Option<&str>,
    ) -> Result<Launch, Error> {
        let attempt = req.attempt;
        let token = req.token();
        let mut tag_list = vec![
            tag(tags::CONTROLLER, &self.controller_id),
            tag(tags::NAMESPACE, &req.owner.namespace),
            tag(tags::NAME, &req.owner.name),
            tag(tags::UID, &req.owner_uid),
            tag(tags::SLOT, &req.slot.to_string()),
            tag(tags::ATTEMPT, &attempt.to_string()),
            tag(tags::SPEC_HASH, &req.spec_hash),
            tag(tags::PORT, &req.port.to_string()),
            tag("Name", &format!("{}-{}", req.owner, req.slot)),
        ];
        for (k, v) in &aws.tags {
            if !k.starts_with("fleetlb.dev/") && k != "Name" {
                tag_list.push(tag(k, v));
            }
        }
        let spec = |rt: ResourceType| {
            TagSpecification::builder()
                .resource_type(rt)
                .set_tags(Some(tag_list.clone()))
                .build()
        };
        let user_data = aws
            .user_data
            .clone()
            .unwrap_or_else(|| default_user_data(&req.owner, req.port));
        let mut call = self
            .client
            .run
            .ready()
            .await
            .run_instances()
            .image_id(&aws.image_id)
            .instance_type(InstanceType::from(req.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .client_token(&token)
            .user_data(aws_smithy_types::base64::encode(user_data.as_bytes()))
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .http_endpoint(aws_sdk_ec2::types::InstanceMetadataEndpointState::Enabled)
                    .build(),
            )
            // Every resource type RunInstances creates carries the ownership tag in the
            // request: IAM evaluates `aws:RequestTag` per resource type, so an untagged network
            // interface alone would make the whole call `UnauthorizedOperation`.
            .tag_specifications(spec(ResourceType::Instance))
            .tag_specifications(spec(ResourceType::Volume))
            .tag_specifications(spec(ResourceType::NetworkInterface))
            .set_security_group_ids(
                (!aws.security_group_ids.is_empty()).then(|| aws.security_group_ids.clone()),
            );
        if let Some(s) = subnet {
            call = call.subnet_id(s);
        }
        if let Some(k) = &aws.key_name {
            call = call.key_name(k);
        }
        if let Some(p) = &aws.iam_instance_profile {
            let spec = if p.starts_with("arn:") {
                IamInstanceProfileSpecification::builder().arn(p).build()
            } else {
                IamInstanceProfileSpecification::builder().name(p).build()
            };
            call = call.iam_instance_profile(spec);
        }
        let r = call.send().await;
        self.count("RunInstances", &r);
        let launch_error = |message: &str| Error::Provider {
            provider: "aws",
            operation: "launch",
            message: message.into(),
        };
        match r {
            Ok(out) => {
                let i = out
                    .instances()
                    .first()
                    .ok_or_else(|| launch_error("RunInstances returned no instance"))?;
                let i = to_instance(i, &self.controller_id).ok_or_else(|| {
                    launch_error("RunInstances returned an instance without fleetlb's tags")
                })?;
                Ok(gone_or_made(i))
            }
            // The token was used before with other parameters. Which instance holds it says
            // whether this is our launch (wait for it to be listed) or a second install using
            // this controller id (a configuration error, reported).
            Err(e) if e.code() == Some("IdempotentParameterMismatch") => {
                self.by_token(&token).await
            }
            Err(e) => {
                if e.code() == Some("InsufficientInstanceCapacity")
                    && let Some(s) = subnet
                {
                    self.mark_no_capacity(&req.instance_type, s);
                    return Ok(Launch::NextAttempt(Self::fail("launch", &e).to_string()));
                }
                Err(Self::fail("launch", &e))
            }
        }
    }

    /// The launch behind a ClientToken EC2 already knows, found by the `client-token` filter.
    async fn by_token(&self, token: &str) -> Result<Launch, Error> {
        let r = self
            .client
            .describe
            .ready()
            .await
            .describe_instances()
            .filters(Filter::builder().name("client-token").values(token).build())
            .send()
            .await;
        self.count("DescribeInstances", &r);
        let out = r.map_err(|e| Self::fail("launch", &e))?;
        let Some(found) = out.reservations().iter().flat_map(|r| r.instances()).next() else {
            // Not listed yet (DescribeInstances is eventually consistent): wait.
            return Ok(Launch::Pending);
        };
        match to_instance(found, &self.controller_id) {
            Some(i) => Ok(gone_or_made(i)),
            None => Err(Error::Provider {
                provider: "aws",
                operation: "launch",
                message: format!(
                    "IdempotentParameterMismatch: ClientToken {token} belongs to instance {} of controller id {:?}: does another install use --controller-id {}?",
                    found.instance_id().unwrap_or("?"),
                    tag_of(found, tags::CONTROLLER).unwrap_or(""),
                    self.controller_id
                ),
            }),
        }
    }
}

/// An instance a token answered with: ours, or gone already (the token is spent: next attempt).
fn gone_or_made(i: Instance) -> Launch {
    if matches!(
        i.state,
        InstanceState::Terminated | InstanceState::ShuttingDown
    ) {
        Launch::NextAttempt(format!(
            "the launch token of attempt {} was spent on {}, which is {}",
            i.attempt,
            i.id,
            i.state.as_str()
        ))
    } else {
        Launch::Made(Box::new(i))
    }
}

fn tag(k: &str, v: &str) -> Tag {
    Tag::builder().key(k).value(v).build()
}

pub use crate::provider::client_token;

/// The default bootstrap: a tiny HTTP app like the original FastAPI one, answering `/health`
/// and naming the instance (from IMDSv2) and cluster on every other path.
pub fn default_user_data(owner: &ClusterKey, port: u16) -> String {
    format!(
        r#"#!/bin/bash
# fleetlb default bootstrap: an HTTP app like the original experiment's FastAPI one.
TOKEN=$(curl -sX PUT http://169.254.169.254/latest/api/token -H 'X-aws-ec2-metadata-token-ttl-seconds: 300')
export INSTANCE_ID=$(curl -s -H "X-aws-ec2-metadata-token: $TOKEN" http://169.254.169.254/latest/meta-data/instance-id)
export CLUSTER_NAME='{owner}'
cat > /opt/fleetlb-app.py <<'PY'
import json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
iid, cluster = os.environ["INSTANCE_ID"], os.environ["CLUSTER_NAME"]
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            body = {{"status": "ok"}}
        else:
            body = {{"message": f"Instance {{iid}} of {{cluster}} has received the request", "instance_id": iid, "cluster": cluster}}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("0.0.0.0", {port}), H).serve_forever()
PY
nohup python3 /opt/fleetlb-app.py >/var/log/fleetlb-app.log 2>&1 &
"#
    )
}

fn tag_of<'a>(i: &'a aws_sdk_ec2::types::Instance, key: &str) -> Option<&'a str> {
    i.tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

fn to_instance(i: &aws_sdk_ec2::types::Instance, controller: &str) -> Option<Instance> {
    if tag_of(i, tags::CONTROLLER) != Some(controller) {
        return None;
    }
    let state = match i.state().and_then(|s| s.name()) {
        Some(InstanceStateName::Pending) => InstanceState::Pending,
        Some(InstanceStateName::Running) => InstanceState::Running,
        Some(InstanceStateName::ShuttingDown) => InstanceState::ShuttingDown,
        Some(InstanceStateName::Stopping) => InstanceState::Stopping,
        Some(InstanceStateName::Stopped) => InstanceState::Stopped,
        _ => InstanceState::Terminated,
    };
    let port: u16 = tag_of(i, tags::PORT)
        .and_then(|p| p.parse().ok())
        .unwrap_or(8000);
    let address = i
        .private_ip_address()
        .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, port));
    Some(Instance {
        id: i.instance_id()?.to_string(),
        owner: ClusterKey {
            namespace: tag_of(i, tags::NAMESPACE)?.to_string(),
            name: tag_of(i, tags::NAME)?.to_string(),
        },
        owner_uid: tag_of(i, tags::UID).unwrap_or("").to_string(),
        slot: tag_of(i, tags::SLOT)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        attempt: tag_of(i, tags::ATTEMPT)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        address,
        state,
        instance_type: i
            .instance_type()
            .map(|t| t.as_str().to_string())
            .unwrap_or_default(),
        spec_hash: tag_of(i, tags::SPEC_HASH).unwrap_or("").to_string(),
        launched_at: i
            .launch_time()
            .and_then(|t| SystemTime::try_from(*t).ok())
            .unwrap_or(SystemTime::UNIX_EPOCH),
        launched_as: Some(LaunchedAs {
            image_id: i.image_id().map(String::from),
            subnet_id: i.subnet_id().map(String::from),
            security_groups: {
                let mut g: Vec<String> = i
                    .security_groups()
                    .iter()
                    .filter_map(|g| g.group_id().map(String::from))
                    .collect();
                g.sort();
                g
            },
        }),
        client_token: i.client_token().filter(|t| !t.is_empty()).map(String::from),
        provider: ProviderKind::Aws,
    })
}

impl Provider for AwsProvider {
    fn name(&self) -> &'static str {
        "aws"
    }

    fn token_scope(&self) -> &str {
        &self.controller_id
    }

    fn list<'a>(
        &'a self,
        _clusters: &'a [Arc<BackendCluster>],
    ) -> BoxFuture<'a, Result<Vec<Instance>, Error>> {
        async move {
            let states = [
                "pending",
                "running",
                "shutting-down",
                "stopping",
                "stopped",
                "terminated",
            ];
            let mut pages = self
                .client
                .describe
                .ready()
                .await
                .describe_instances()
                .filters(
                    Filter::builder()
                        .name(format!("tag:{}", tags::CONTROLLER))
                        .values(&self.controller_id)
                        .build(),
                )
                .filters(
                    Filter::builder()
                        .name("instance-state-name")
                        .set_values(Some(states.iter().map(|s| s.to_string()).collect()))
                        .build(),
                )
                .into_paginator()
                .send();
            let mut out = Vec::new();
            while let Some(page) = pages.next().await {
                self.count("DescribeInstances", &page);
                let page = page.map_err(|e| Self::fail("list", &e))?;
                for r in page.reservations() {
                    out.extend(
                        r.instances()
                            .iter()
                            .filter_map(|i| to_instance(i, &self.controller_id)),
                    );
                }
            }
            Ok(out)
        }
        .boxed()
    }

    fn launch<'a>(&'a self, req: &'a LaunchRequest) -> BoxFuture<'a, Result<Launch, Error>> {
        async move {
            let ProviderSpec::Aws(aws) = &req.provider else {
                return Err(Error::Provider {
                    provider: "aws",
                    operation: "launch",
                    message: "not an aws spec".into(),
                });
            };
            // The subnet follows from (slot, attempt): a replay of this intent carries the same
            // parameters. A subnet without capacity, or a token EC2 already spent on an
            // instance that is gone, means the next attempt (new token, next subnet), which the
            // caller records before launching it.
            let subnet = subnet_for(&aws.subnet_ids, req.slot, req.attempt);
            if let Some(s) = subnet
                && !self.capacity_ok(&req.instance_type, s)
            {
                return Ok(Launch::NextAttempt(format!(
                    "InsufficientInstanceCapacity: {s} has no {} capacity (seen in the last 3 minutes)",
                    req.instance_type
                )));
            }
            self.run_one(req, aws, subnet).await
        }
        .boxed()
    }

    fn terminate<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), Error>> {
        async move {
            for chunk in ids.chunks(100) {
                let r = self
                    .client
                    .terminate
                    .ready()
                    .await
                    .terminate_instances()
                    .set_instance_ids(Some(chunk.to_vec()))
                    .send()
                    .await;
                self.count("TerminateInstances", &r);
                r.map_err(|e| Self::fail("terminate", &e))?;
            }
            Ok(())
        }
        .boxed()
    }

    fn release<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), Error>> {
        async move {
            for chunk in ids.chunks(100) {
                let r = self
                    .client
                    .tags
                    .ready()
                    .await
                    .delete_tags()
                    .set_resources(Some(chunk.to_vec()))
                    .tags(tag(tags::CONTROLLER, &self.controller_id))
                    .send()
                    .await;
                self.count("DeleteTags", &r);
                r.map_err(|e| Self::fail("release", &e))?;
            }
            Ok(())
        }
        .boxed()
    }
}

/// An [`AwsProvider`] built on first use, so a process without `aws` clusters never loads AWS
/// configuration (which would look for credentials and query the instance metadata service).
pub struct LazyAwsProvider {
    endpoint: Option<String>,
    controller_id: String,
    metrics: Metrics,
    leader: Option<tokio::sync::watch::Receiver<bool>>,
    cell: tokio::sync::OnceCell<AwsProvider>,
}

impl LazyAwsProvider {
    /// See [`AwsProvider::from_env`].
    pub fn new(
        endpoint: Option<String>,
        controller_id: String,
        metrics: Metrics,
        leader: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Self {
        Self {
            endpoint,
            controller_id,
            metrics,
            leader,
            cell: tokio::sync::OnceCell::new(),
        }
    }

    async fn get(&self) -> &AwsProvider {
        self.cell
            .get_or_init(|| {
                AwsProvider::from_env(
                    self.endpoint.clone(),
                    self.controller_id.clone(),
                    self.metrics.clone(),
                    self.leader.clone(),
                )
            })
            .await
    }
}

impl Provider for LazyAwsProvider {
    fn name(&self) -> &'static str {
        "aws"
    }

    fn token_scope(&self) -> &str {
        &self.controller_id
    }

    fn list<'a>(
        &'a self,
        clusters: &'a [Arc<BackendCluster>],
    ) -> BoxFuture<'a, Result<Vec<Instance>, Error>> {
        async move { self.get().await.list(clusters).await }.boxed()
    }

    fn launch<'a>(&'a self, req: &'a LaunchRequest) -> BoxFuture<'a, Result<Launch, Error>> {
        async move { self.get().await.launch(req).await }.boxed()
    }

    fn terminate<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), Error>> {
        async move { self.get().await.terminate(ids).await }.boxed()
    }

    fn release<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), Error>> {
        async move { self.get().await.release(ids).await }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_lets_a_burst_through_then_paces_calls() {
        let limit = RateLimit::new(2.0, 3.0);
        let start = tokio::time::Instant::now();
        for _ in 0..3 {
            limit.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "the burst passes at once");
        for _ in 0..4 {
            limit.acquire().await;
        }
        // Four more at 2 per second.
        assert!(
            start.elapsed() >= Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert!(
            start.elapsed() < Duration::from_millis(2100),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn tokens_are_stable_short_and_distinct_per_intent() {
        let a = client_token("uid-1", 3, "abc", 0);
        assert_eq!(a, client_token("uid-1", 3, "abc", 0));
        assert_ne!(a, client_token("uid-1", 3, "abc", 1));
        assert_ne!(a, client_token("uid-2", 3, "abc", 0));
        assert!(a.len() <= 64 && a.is_ascii());
    }
}
