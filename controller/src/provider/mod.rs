//! Where instances come from: the [`Provider`] trait and the instance model shared by all
//! providers.
//!
//! A provider is EC2-shaped: instances have ids and states, carry their owner (cluster key and
//! object UID), slot and spec hash from creation on, and are listed for **all** clusters in one
//! call per reconcile pass (never one call per object).

pub mod aws;
pub mod endpoints;
mod instance;
pub mod leader_only;
pub mod local;
mod token;

use std::fmt;
use std::sync::Arc;

use fleetlb_crds::{BackendCluster, ProviderSpec};
use futures::future::BoxFuture;
use serde::Serialize;

use crate::Error;
use crate::error::{ErrorClass, Operation};

pub use instance::{Instance, InstanceState, LaunchedAs};
pub use token::{client_token, fnv64, scoped_token, spec_hash, subnet_for, type_for};

/// Namespace and name of a BackendCluster.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterKey {
    /// Namespace (`default` when the YAML names none).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl ClusterKey {
    /// The key of `bc`.
    pub fn of(bc: &BackendCluster) -> Self {
        Self::of_meta(&bc.metadata)
    }

    /// The key of the object with metadata `meta`.
    pub fn of_meta(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self {
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl fmt::Display for ClusterKey {
    /// `name` in the default namespace, `namespace/name` elsewhere (as metrics label the cluster).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace == "default" {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// The providers, by their `spec.provider` key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// EC2.
    Aws,
    /// Local child processes.
    Local,
    /// Listed endpoints.
    Static,
}

impl ProviderKind {
    /// Every kind.
    pub const ALL: [ProviderKind; 3] =
        [ProviderKind::Aws, ProviderKind::Local, ProviderKind::Static];

    /// The `spec.provider` key (`aws`, `local`, `static`).
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Aws => "aws",
            ProviderKind::Local => "local",
            ProviderKind::Static => "static",
        }
    }

    /// The kind `spec` names.
    pub fn of(spec: &ProviderSpec) -> Self {
        match spec {
            ProviderSpec::Aws(_) => ProviderKind::Aws,
            ProviderSpec::Local(_) => ProviderKind::Local,
            ProviderSpec::Static(_) => ProviderKind::Static,
        }
    }

    /// The kind for a `spec.provider` key.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything a provider needs to launch one instance.
#[derive(Clone, Debug)]
pub struct LaunchRequest {
    /// Owner.
    pub owner: ClusterKey,
    /// Owner UID.
    pub owner_uid: String,
    /// Slot.
    pub slot: u32,
    /// The instance type of this attempt (`type_for` of the cluster's types).
    pub instance_type: String,
    /// `spec.instanceTypes` (empty with the `instanceType` shorthand): later attempts of the
    /// slot take the next type (see `type_for`).
    pub instance_types: Vec<String>,
    /// `spec.port`.
    pub port: u16,
    /// `spec.protocol` is `GRPC`: a `local` instance serves the demo gRPC services too.
    pub grpc: bool,
    /// `spec.capacityType`: the EC2 market(s) an `aws` launch may use.
    pub capacity_type: fleetlb_crds::CapacityType,
    /// `spec.provider`.
    pub provider: ProviderSpec,
    /// Spec hash recorded on the instance.
    pub spec_hash: String,
    /// Launch attempt for the slot: one more than any instance the slot had. Together with
    /// owner UID, slot and spec hash it names the launch intent (the EC2 `ClientToken`).
    pub attempt: u32,
    /// The provider's [`Provider::token_scope`] (this install's id for `aws`).
    pub token_scope: String,
    /// A repeat of an intent recorded in status and never seen as an instance: it may have
    /// been sent, so it is sent again (same token, same parameters) rather than passed over
    /// for a shortage remembered since.
    pub replay: bool,
}

impl LaunchRequest {
    /// The attempt as the subnet rotation counts it: each subnet takes one attempt per type
    /// and market (see [`type_for`], [`LaunchRequest::spot`]).
    pub fn zone_attempt(&self) -> u32 {
        self.attempt / self.per_subnet()
    }

    /// Attempts per subnet: one per type, per market (`spot-then-on-demand` has two).
    pub fn per_subnet(&self) -> u32 {
        let types = u32::try_from(self.instance_types.len().max(1)).unwrap_or(1);
        types.saturating_mul(markets(self.capacity_type))
    }

    /// Whether this attempt asks for spot: `spot` always, `on-demand` never,
    /// `spot-then-on-demand` each type in spot first, then each in on-demand, in the same
    /// subnet before the next.
    pub fn spot(&self) -> bool {
        let types = u32::try_from(self.instance_types.len().max(1)).unwrap_or(1);
        match self.capacity_type {
            fleetlb_crds::CapacityType::OnDemand => false,
            fleetlb_crds::CapacityType::Spot => true,
            fleetlb_crds::CapacityType::SpotThenOnDemand => {
                (self.attempt / types).is_multiple_of(2)
            }
        }
    }

    /// Moves on to `attempt`, with its instance type (never sent before: not a replay).
    pub fn set_attempt(&mut self, attempt: u32) {
        self.attempt = attempt;
        self.replay = false;
        if !self.instance_types.is_empty() {
            let types: Vec<&str> = self.instance_types.iter().map(String::as_str).collect();
            self.instance_type = type_for(&types, attempt);
        }
    }

    /// The idempotency token of this request (its slot's attempt `attempt`).
    pub fn token(&self) -> String {
        // With several types the spec hash leaves them out (editing the list replaces
        // nothing): the token names this attempt's type itself.
        let mut hash = if self.instance_types.len() > 1 {
            format!("{}/{}", self.spec_hash, self.instance_type)
        } else {
            self.spec_hash.clone()
        };
        // `arm64ImageId` is out of the spec hash too (changing it replaces only the arm64
        // instances, by their image): the token names the attempt's image, so a replay after
        // an image edit is a new launch, never a repeat with other parameters.
        if let ProviderSpec::Aws(a) = &self.provider {
            if a.arm64_image_id.is_some() {
                hash.push('/');
                hash.push_str(a.image_for(&self.instance_type));
            }
            // The market and the subnet follow from the attempt through `capacityType` and the
            // type count, which the spec hash leaves out: the token names them, so an edit of
            // either never repeats a token with other parameters.
            if self.capacity_type != fleetlb_crds::CapacityType::OnDemand {
                hash.push('/');
                hash.push_str(market(self.spot()));
            }
            if self.per_subnet() > 1
                && let Some(s) = subnet_for(&a.subnet_ids, self.slot, self.zone_attempt())
            {
                hash.push('/');
                hash.push_str(s);
            }
        }
        scoped_token(
            &self.token_scope,
            &self.owner_uid,
            self.slot,
            &hash,
            self.attempt,
        )
    }
}

/// What a launch call did.
#[derive(Debug)]
pub enum Launch {
    /// The instance of this intent (made now, or earlier under the same token).
    Made(Box<Instance>),
    /// The provider already has this intent (EC2's `IdempotentParameterMismatch` for a replayed
    /// token) and does not list its instance yet: wait for it to appear.
    Pending,
    /// This attempt cannot be used (its subnet has no capacity, or its token was spent on an
    /// instance that is gone): the caller records the next attempt, then launches that, so a
    /// crash in between replays the next attempt rather than this one.
    NextAttempt(ErrorClass, String),
}

/// The EC2 market's name as status, Events and tokens write it.
pub fn market(spot: bool) -> &'static str {
    if spot { "spot" } else { "on-demand" }
}

/// How many markets a launch of `capacity` tries in each subnet.
pub fn markets(capacity: fleetlb_crds::CapacityType) -> u32 {
    match capacity {
        fleetlb_crds::CapacityType::SpotThenOnDemand => 2,
        _ => 1,
    }
}

/// A source of instances.
///
/// Called by the reconcile loop only, never on the request path. Every method may be retried by
/// the caller after an error.
pub trait Provider: Send + Sync {
    /// Which provider this is (`aws`, `local`, `static`).
    fn kind(&self) -> ProviderKind;

    /// Every instance this controller owns through this provider, for all clusters in one call,
    /// including ones in `shutting-down` or recently `terminated`. `clusters` are the objects
    /// currently known (the `static` provider derives its instances from them; others ignore it).
    fn list<'a>(
        &'a self,
        clusters: &'a [Arc<BackendCluster>],
    ) -> BoxFuture<'a, Result<Vec<Instance>, Error>>;

    /// Launches attempt `req.attempt` of one slot, and only that attempt. Must be idempotent
    /// for the same intent (the EC2 `ClientToken`).
    fn launch<'a>(&'a self, req: &'a LaunchRequest) -> BoxFuture<'a, Result<Launch, Error>>;

    /// Starts terminating `ids`; returns once the provider has accepted the request.
    fn terminate<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), Error>>;

    /// Drops fleetlb's ownership of `ids` without stopping them (`deletionPolicy: Orphan`).
    /// The default does nothing.
    fn release<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), Error>> {
        let _ = ids;
        Box::pin(async { Ok(()) })
    }

    /// Whether this provider launches and terminates instances (false for `static`).
    fn manages_instances(&self) -> bool {
        true
    }

    /// `instance` got a spot interruption warning or a rebalance recommendation (`why`): its
    /// capacity pool is being reclaimed or is at risk. The default does nothing; `aws` marks
    /// its (type, subnet) spot capacity unavailable, as for a capacity shortage, so the
    /// replacement goes elsewhere (as Karpenter does).
    fn spot_interrupted(&self, instance: &Instance, why: &str) {
        let _ = (instance, why);
    }

    /// What makes this provider's launch tokens unique beyond the object (`aws`: the install's
    /// controller id, since EC2 keeps tokens per account: two installs with objects of the same
    /// UID, as standalone derives them from namespace and name, must not send the same token).
    fn token_scope(&self) -> &str {
        ""
    }
}

/// The providers available to a driver, by `spec.provider` kind.
#[derive(Clone, Default)]
pub struct Providers {
    /// `local`: child processes.
    pub local: Option<Arc<dyn Provider>>,
    /// `static`: listed endpoints.
    pub endpoints: Option<Arc<dyn Provider>>,
    /// `aws`: EC2.
    pub aws: Option<Arc<dyn Provider>>,
}

impl Providers {
    /// The provider of `kind`, if this process has one.
    pub fn get(&self, kind: ProviderKind) -> Option<Arc<dyn Provider>> {
        match kind {
            ProviderKind::Local => self.local.clone(),
            ProviderKind::Static => self.endpoints.clone(),
            ProviderKind::Aws => self.aws.clone(),
        }
    }

    /// `get`, or the error a condition shows when this process has no such provider.
    pub fn require(&self, kind: ProviderKind) -> Result<Arc<dyn Provider>, Error> {
        self.get(kind).ok_or_else(|| {
            let message = match kind {
                ProviderKind::Aws => "the aws provider needs a unique id for this install: start fleetlb with --controller-id (instances of other ids are never touched)".to_string(),
                _ => format!("the {kind} provider is not configured in this process"),
            };
            Error::new(kind, Operation::List, ErrorClass::NotConfigured, message)
        })
    }

    /// The same providers, each refusing to launch, terminate or release unless `leader` says
    /// this replica leads at the moment of the call (see [`leader_only::LeaderOnly`]).
    pub fn leader_only(
        self,
        leader: tokio::sync::watch::Receiver<bool>,
        term: crate::lease::Term,
    ) -> Self {
        let wrap = |p: Option<Arc<dyn Provider>>| {
            p.map(|inner| {
                Arc::new(leader_only::LeaderOnly::new(
                    inner,
                    leader.clone(),
                    term.clone(),
                )) as Arc<dyn Provider>
            })
        };
        Self {
            local: wrap(self.local),
            endpoints: wrap(self.endpoints),
            aws: wrap(self.aws),
        }
    }
}
