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

mod bootstrap;
mod client;
mod lazy;
mod schema;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    Filter, HttpTokensState, IamInstanceProfileSpecification, InstanceInterruptionBehavior,
    InstanceMarketOptionsRequest, InstanceMetadataOptionsRequest, InstanceType, MarketType,
    ResourceType, SpotInstanceType, SpotMarketOptions, TagSpecification,
};
use fleetlb_crds::{BackendCluster, ProviderSpec};
use futures::FutureExt;
use futures::future::BoxFuture;

use crate::Error;
use crate::error::{ErrorClass, Operation};
use crate::metrics::Metrics;
use crate::provider::{
    Instance, InstanceState, Launch, LaunchRequest, Provider, ProviderKind, subnet_for,
};

pub use crate::provider::client_token;
pub use bootstrap::default_user_data;
pub use client::Timeouts;
use client::{Clients, fail};
pub use lazy::LazyAwsProvider;
pub use schema::keys as tags;
use schema::{keys, tag, tag_of, to_instance};

/// The EC2 API operations fleetlb calls, for the IAM policy check.
pub const EC2_OPERATIONS: &[&str] = &[
    "DescribeInstances",
    "RunInstances",
    "TerminateInstances",
    "DeleteTags",
];

/// How long an (instance type, subnet) stays unavailable after `InsufficientInstanceCapacity`.
const CAPACITY_BACKOFF: Duration = Duration::from_secs(180);

/// (instance type, subnet, spot).
type Offering = (String, String, bool);

/// In an offering key, every subnet (a quota, an architecture) or every type (the account's
/// whole market).
const ANY: &str = "*";

/// EC2 through aws-sdk-ec2.
pub struct AwsProvider {
    client: Clients,
    controller_id: String,
    metrics: Metrics,
    /// (instance type, subnet, spot) offerings EC2 had no capacity for, since when, and why
    /// (EC2's error code, or a spot interruption).
    no_capacity: Mutex<HashMap<Offering, (Instant, String)>>,
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

    /// Why (type, subnet, market) is taken to have no capacity now, if it is.
    fn shortage(&self, instance_type: &str, subnet: &str, spot: bool) -> Option<String> {
        let mut map = self.no_capacity.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, (since, _)| since.elapsed() < CAPACITY_BACKOFF);
        [(instance_type, subnet), (instance_type, ANY), (ANY, ANY)]
            .into_iter()
            .find_map(|(t, s)| map.get(&(t.to_string(), s.to_string(), spot)))
            .map(|(_, why)| why.clone())
    }

    fn mark_no_capacity(&self, instance_type: &str, subnet: &str, spot: bool, why: &str) {
        let mut map = self.no_capacity.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(
            (instance_type.to_string(), subnet.to_string(), spot),
            (Instant::now(), why.to_string()),
        );
    }

    async fn run_one(
        &self,
        req: &LaunchRequest,
        aws: &fleetlb_crds::AwsProvider,
        subnet: Option<&str>,
        spot: bool,
    ) -> Result<Launch, Error> {
        let attempt = req.attempt;
        let token = req.token();
        let mut tag_list = vec![
            tag(keys::CONTROLLER, &self.controller_id),
            tag(keys::NAMESPACE, &req.owner.namespace),
            tag(keys::NAME, &req.owner.name),
            tag(keys::UID, &req.owner_uid),
            tag(keys::SLOT, &req.slot.to_string()),
            tag(keys::ATTEMPT, &attempt.to_string()),
            tag(keys::SPEC_HASH, &req.spec_hash),
            tag(keys::PORT, &req.port.to_string()),
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
            .image_id(aws.image_for(&req.instance_type))
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
        if spot {
            // A one-time spot request that terminates on interruption, tagged like the
            // instance it makes (IAM allows the request with the tag only).
            call = call
                .instance_market_options(
                    InstanceMarketOptionsRequest::builder()
                        .market_type(MarketType::Spot)
                        .spot_options(
                            SpotMarketOptions::builder()
                                .spot_instance_type(SpotInstanceType::OneTime)
                                .instance_interruption_behavior(
                                    InstanceInterruptionBehavior::Terminate,
                                )
                                .build(),
                        )
                        .build(),
                )
                .tag_specifications(spec(ResourceType::SpotInstancesRequest));
        }
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
        let launch_error = |message: &str| {
            Error::new(
                ProviderKind::Aws,
                Operation::Launch,
                ErrorClass::Other,
                message,
            )
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
                // The type's architecture is not the image's (a family fleetlb classifies
                // wrongly, or one image for both): this type cannot launch here, the next
                // type may.
                let wrong_arch = e.code() == Some("InvalidParameterValue")
                    && e.message().is_some_and(|m| m.contains("architecture"));
                if wrong_arch || e.code().is_some_and(|c| no_capacity_code(c, spot)) {
                    // Without subnets EC2 picks the zone: the next attempt is the next type or
                    // market there.
                    let s = subnet.unwrap_or("the default subnet");
                    let why = e.code().unwrap_or_default();
                    match why {
                        // The spot vCPU quota of the type's family group: no subnet will do
                        // for this type (a smaller type may still fit).
                        "MaxSpotInstanceCountExceeded" => {
                            self.mark_no_capacity(&req.instance_type, ANY, spot, why);
                        }
                        // The account cannot create spot requests at all yet.
                        "AuthFailure.ServiceLinkedRoleCreationNotPermitted" => {
                            self.mark_no_capacity(ANY, ANY, spot, why);
                        }
                        // The type's architecture is not its image's, in any subnet or market.
                        _ if wrong_arch => {
                            for market in [false, true] {
                                let why = "architecture mismatch";
                                self.mark_no_capacity(&req.instance_type, ANY, market, why);
                            }
                        }
                        _ => self.mark_no_capacity(&req.instance_type, s, spot, why),
                    }
                    return Ok(Launch::NextAttempt(
                        ErrorClass::Capacity,
                        format!(
                            "{} {} in {s}: {}",
                            req.instance_type,
                            crate::provider::market(spot),
                            fail(Operation::Launch, &e).message
                        ),
                    ));
                }
                Err(fail(Operation::Launch, &e))
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
        let out = r.map_err(|e| fail(Operation::Launch, &e))?;
        let Some(found) = out.reservations().iter().flat_map(|r| r.instances()).next() else {
            // Not listed yet (DescribeInstances is eventually consistent): wait.
            return Ok(Launch::Pending);
        };
        match to_instance(found, &self.controller_id) {
            Some(i) => Ok(gone_or_made(i)),
            None => Err(Error::new(
                ProviderKind::Aws,
                Operation::Launch,
                ErrorClass::Invalid,
                format!(
                    "IdempotentParameterMismatch: ClientToken {token} belongs to instance {} of controller id {:?}: does another install use --controller-id {}?",
                    found.instance_id().unwrap_or("?"),
                    tag_of(found, keys::CONTROLLER).unwrap_or(""),
                    self.controller_id
                ),
            )),
        }
    }
}

/// An instance a token answered with: ours, or gone already (the token is spent: next attempt).
fn gone_or_made(i: Instance) -> Launch {
    if matches!(
        i.state,
        InstanceState::Terminated | InstanceState::ShuttingDown
    ) {
        Launch::NextAttempt(
            ErrorClass::Other,
            format!(
                "the launch token of attempt {} was spent on {}, which is {}",
                i.attempt,
                i.id,
                i.state.as_str()
            ),
        )
    } else {
        Launch::Made(Box::new(i))
    }
}

impl Provider for AwsProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Aws
    }

    fn spot_interrupted(&self, instance: &Instance, why: &str) {
        if let Some(l) = instance.launched_as.as_ref().filter(|l| l.spot) {
            let subnet = l.subnet_id.as_deref().unwrap_or("the default subnet");
            tracing::info!(id = %instance.id, instance_type = %instance.instance_type, subnet, "{why}: no spot launches of this type in this subnet for 3 minutes");
            self.mark_no_capacity(&instance.instance_type, subnet, true, why);
        }
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
                        .name(format!("tag:{}", keys::CONTROLLER))
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
                let page = page.map_err(|e| fail(Operation::List, &e))?;
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
                return Err(Error::new(
                    ProviderKind::Aws,
                    Operation::Launch,
                    ErrorClass::Invalid,
                    "not an aws spec",
                ));
            };
            // The subnet follows from (slot, attempt): a replay of this intent carries the same
            // parameters. A subnet without capacity, or a token EC2 already spent on an
            // instance that is gone, means the next attempt (new token, next subnet), which the
            // caller records before launching it.
            // The market is the attempt's too (spot-then-on-demand: spot, then on-demand, in
            // the same subnet). An offering that has shown a shortage in the last minutes is
            // passed over without a call.
            let subnet = subnet_for(&aws.subnet_ids, req.slot, req.zone_attempt());
            let where_ = subnet.unwrap_or("the default subnet");
            let spot = req.spot();
            if let Some(why) = self
                .shortage(&req.instance_type, where_, spot)
                .filter(|_| !req.replay)
            {
                return Ok(Launch::NextAttempt(
                    ErrorClass::Capacity,
                    format!(
                        "{why}: {} has no {} {} capacity (seen in the last 3 minutes)",
                        where_,
                        crate::provider::market(spot),
                        req.instance_type
                    ),
                ));
            }
            self.run_one(req, aws, subnet, spot).await
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
                r.map_err(|e| fail(Operation::Terminate, &e))?;
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
                    .tags(tag(keys::CONTROLLER, &self.controller_id))
                    .send()
                    .await;
                self.count("DeleteTags", &r);
                r.map_err(|e| fail(Operation::Release, &e))?;
            }
            Ok(())
        }
        .boxed()
    }
}

/// Whether EC2's error `code` says the offering (type, zone, market) cannot be had now, so the
/// next attempt goes elsewhere (Karpenter's list): no capacity, the type not offered in that
/// zone (`Unsupported`), a subnet out of addresses, a vCPU quota of the type's family, and for
/// spot the spot quota and an account that may not create the spot service-linked role.
fn no_capacity_code(code: &str, spot: bool) -> bool {
    matches!(
        code,
        "InsufficientInstanceCapacity"
            | "Unsupported"
            | "InsufficientFreeAddressesInSubnet"
            | "VcpuLimitExceeded"
            | "ReservationCapacityExceeded"
            | "UnfulfillableCapacity"
    ) || (spot
        && matches!(
            code,
            "MaxSpotInstanceCountExceeded" | "AuthFailure.ServiceLinkedRoleCreationNotPermitted"
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A provider whose EC2 endpoint refuses connections: a call fails at once.
    fn unreachable() -> AwsProvider {
        let conf = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url("http://127.0.0.1:1")
            .credentials_provider(aws_sdk_ec2::config::SharedCredentialsProvider::new(
                aws_sdk_ec2::config::Credentials::new("testing", "testing", None, None, "test"),
            ))
            .build();
        let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
        let timeouts = Timeouts {
            connect: Duration::from_millis(200),
            attempt: Duration::from_millis(200),
            operation: Duration::from_secs(1),
        };
        AwsProvider::with_timeouts(&conf, "ctl".into(), metrics, timeouts)
    }

    fn request(replay: bool) -> LaunchRequest {
        LaunchRequest {
            owner: crate::provider::ClusterKey {
                namespace: "default".into(),
                name: "web".into(),
            },
            owner_uid: "uid".into(),
            slot: 0,
            instance_type: "t3.small".into(),
            instance_types: Vec::new(),
            port: 8000,
            grpc: false,
            capacity_type: fleetlb_crds::CapacityType::OnDemand,
            provider: ProviderSpec::Aws(fleetlb_crds::AwsProvider {
                image_id: "ami-00000001".into(),
                subnet_ids: vec!["subnet-a".into()],
                ..Default::default()
            }),
            spec_hash: "h".into(),
            attempt: 0,
            token_scope: "ctl".into(),
            replay,
        }
    }

    #[tokio::test]
    async fn a_remembered_shortage_passes_over_a_new_attempt_but_never_a_replay() {
        let p = unreachable();
        p.mark_no_capacity(
            "t3.small",
            "subnet-a",
            false,
            "InsufficientInstanceCapacity",
        );
        // A new attempt: passed over without a call.
        let fresh = p.launch(&request(false)).await;
        assert!(
            matches!(fresh, Ok(Launch::NextAttempt(ErrorClass::Capacity, _))),
            "{fresh:?}"
        );
        // A recorded intent that may have been sent: sent again (here it cannot connect).
        let again = p.launch(&request(true)).await;
        assert!(again.is_err(), "{again:?}");
        // The spot quota of a type holds in every subnet; other types still try.
        let p = unreachable();
        let mut spot = request(false);
        spot.capacity_type = fleetlb_crds::CapacityType::Spot;
        p.mark_no_capacity("t3.small", ANY, true, "MaxSpotInstanceCountExceeded");
        assert!(matches!(p.launch(&spot).await, Ok(Launch::NextAttempt(..))));
        spot.instance_type = "t3.micro".into();
        assert!(p.launch(&spot).await.is_err(), "another type is asked");
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
