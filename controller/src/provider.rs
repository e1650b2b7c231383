//! Where instances come from: the [`Provider`] trait and the instance model shared by all
//! providers.
//!
//! A provider is EC2-shaped: instances have ids and states, carry their owner (cluster key and
//! object UID), slot and spec hash from creation on, and are listed for **all** clusters in one
//! call per reconcile pass (never one call per object).

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use fleetlb_crds::{BackendCluster, ProviderSpec};
use futures::future::BoxFuture;

use crate::Error;

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
        Self {
            namespace: bc
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: bc.metadata.name.clone().unwrap_or_default(),
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

/// EC2 instance states, in the EC2 API's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstanceState {
    /// Launched, not yet running.
    Pending,
    /// Running (which says nothing about passing health checks).
    Running,
    /// Being terminated.
    ShuttingDown,
    /// Gone.
    Terminated,
    /// Being stopped.
    Stopping,
    /// Stopped; does not serve.
    Stopped,
}

impl InstanceState {
    /// The EC2 API's name of the state.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::ShuttingDown => "shutting-down",
            InstanceState::Terminated => "terminated",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
        }
    }

    /// Counts toward `replicas`: exists and is not on its way out.
    pub fn is_live(self) -> bool {
        matches!(self, InstanceState::Pending | InstanceState::Running)
    }

    /// Stopped (or being stopped) behind fleetlb's back: a console Stop, a scheduled retirement,
    /// a Spot stop. Such an instance serves nothing and stays listed indefinitely, so it is
    /// replaced and terminated.
    pub fn is_stopped(self) -> bool {
        matches!(self, InstanceState::Stopping | InstanceState::Stopped)
    }

    /// Still exists and will not go away unless fleetlb terminates it: live or stopped.
    pub fn needs_terminate(self) -> bool {
        self.is_live() || self.is_stopped()
    }
}

/// One instance as a provider reports it.
#[derive(Clone, Debug)]
pub struct Instance {
    /// Provider id (`i-0123456789abcdef0`).
    pub id: String,
    /// The BackendCluster it belongs to.
    pub owner: ClusterKey,
    /// UID of the owning object, so a re-created object never adopts its predecessor's instances.
    pub owner_uid: String,
    /// Slot (0..replicas) it was launched for.
    pub slot: u32,
    /// Launch attempt for that slot (a replacement is the next attempt).
    pub attempt: u32,
    /// Where it serves, once known.
    pub address: Option<SocketAddr>,
    /// Provider state.
    pub state: InstanceState,
    /// Instance type it was launched as.
    pub instance_type: String,
    /// Hash of the spec fields it was launched from; a different hash means drift.
    pub spec_hash: String,
    /// Launch time.
    pub launched_at: SystemTime,
    /// The launch configuration the provider reports, to catch changes made outside fleetlb
    /// (`None` where there is nothing to compare, as for local processes).
    pub launched_as: Option<LaunchedAs>,
    /// The idempotency token it was launched with (EC2 `ClientToken`), which ties it to the
    /// launch intent recorded in status.
    pub client_token: Option<String>,
    /// The provider that reports it (so a cluster whose `spec.provider` changed retires its old
    /// instances through the old provider).
    pub provider: ProviderKind,
}

/// The providers, by their `spec.provider` key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

/// An instance's configuration as the provider reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaunchedAs {
    /// Machine image.
    pub image_id: Option<String>,
    /// Subnet.
    pub subnet_id: Option<String>,
    /// Security groups, sorted.
    pub security_groups: Vec<String>,
}

impl Instance {
    /// Whether it belongs to the object with UID `uid`: by UID, since a re-created object (or
    /// another install's object of the same name) must never adopt it; static endpoints carry
    /// no owner and belong to the object that lists them.
    pub fn belongs_to(&self, uid: &str) -> bool {
        self.provider == ProviderKind::Static || self.owner_uid == uid
    }

    /// Why this instance no longer matches `bc`'s spec (changed by the user, or behind fleetlb's
    /// back), if it does not.
    pub fn drift(&self, bc: &BackendCluster) -> Option<String> {
        if self.spec_hash != spec_hash(bc) {
            return Some("launched from an older spec".into());
        }
        if !self.instance_type.is_empty() && self.instance_type != bc.spec.instance_type {
            return Some(format!("instance type is {}", self.instance_type));
        }
        let (ProviderSpec::Aws(aws), Some(seen)) = (&bc.spec.provider, &self.launched_as) else {
            return None;
        };
        if let Some(image) = &seen.image_id
            && *image != aws.image_id
        {
            return Some(format!("image is {image}, not {}", aws.image_id));
        }
        if let Some(subnet) = &seen.subnet_id
            && !aws.subnet_ids.is_empty()
            && !aws.subnet_ids.contains(subnet)
        {
            return Some(format!(
                "subnet {subnet} is not in spec.provider.aws.subnetIds"
            ));
        }
        let mut want = aws.security_group_ids.clone();
        want.sort();
        if !want.is_empty() && seen.security_groups != want {
            return Some(format!(
                "security groups are [{}], not [{}]",
                seen.security_groups.join(", "),
                want.join(", ")
            ));
        }
        None
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
    /// `spec.instanceType`.
    pub instance_type: String,
    /// `spec.port`.
    pub port: u16,
    /// `spec.provider`.
    pub provider: ProviderSpec,
    /// Spec hash recorded on the instance.
    pub spec_hash: String,
    /// Launch attempt for the slot: one more than any instance the slot had. Together with
    /// owner UID, slot and spec hash it names the launch intent (the EC2 `ClientToken`).
    pub attempt: u32,
    /// The provider's [`Provider::token_scope`] (this install's id for `aws`).
    pub token_scope: String,
}

impl LaunchRequest {
    /// The idempotency token of this request (its slot's attempt `attempt`).
    pub fn token(&self) -> String {
        scoped_token(
            &self.token_scope,
            &self.owner_uid,
            self.slot,
            &self.spec_hash,
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
    NextAttempt(String),
}

/// A source of instances.
///
/// Called by the reconcile loop only, never on the request path. Every method may be retried by
/// the caller after an error.
pub trait Provider: Send + Sync {
    /// Short name (`aws`, `local`, `static`) for logs, metrics and the `spec.provider` key.
    fn name(&self) -> &'static str;

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

    /// What makes this provider's launch tokens unique beyond the object (`aws`: the install's
    /// controller id, since EC2 keeps tokens per account: two installs with objects of the same
    /// UID, as standalone derives them from namespace and name, must not send the same token).
    fn token_scope(&self) -> &str {
        ""
    }
}

/// The subnet of launch attempt `attempt` of `slot`: a function of the intent alone, so a
/// replayed launch (same `ClientToken`) always carries the same `SubnetId`, as EC2 requires of
/// an idempotent repeat. Consecutive slots and attempts walk through the subnets, so a fleet
/// spreads over them and a replacement (the next attempt) lands in the next one.
pub fn subnet_for(subnets: &[String], slot: u32, attempt: u32) -> Option<&str> {
    if subnets.is_empty() {
        return None;
    }
    let k = (u64::from(slot) + u64::from(attempt)) % subnets.len() as u64;
    subnets.get(usize::try_from(k).ok()?).map(String::as_str)
}

/// Stable 64-bit FNV-1a, for spec hashes and tokens that must not change across releases.
pub fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Hash of the spec fields whose change requires new instances (type, port, provider settings).
pub fn spec_hash(bc: &BackendCluster) -> String {
    let s = &bc.spec;
    let provider = serde_json::to_string(&s.provider).unwrap_or_default();
    let key = format!("{}|{}|{}", s.instance_type, s.port, provider);
    format!("{:016x}", fnv64(key.as_bytes()))
}

/// [`client_token`] within `scope` (see [`Provider::token_scope`]); an empty scope gives
/// [`client_token`]'s token.
pub fn scoped_token(scope: &str, uid: &str, slot: u32, spec_hash: &str, attempt: u32) -> String {
    if scope.is_empty() {
        client_token(uid, slot, spec_hash, attempt)
    } else {
        client_token(&format!("{scope}/{uid}"), slot, spec_hash, attempt)
    }
}

/// The idempotency token of one launch intent (at most 64 ASCII characters): the same owner
/// UID, slot, spec hash and attempt always give the same token.
pub fn client_token(uid: &str, slot: u32, spec_hash: &str, attempt: u32) -> String {
    let h = fnv64(format!("{uid}|{slot}|{spec_hash}|{attempt}").as_bytes());
    format!("fleetlb-{h:016x}-{slot}-{attempt}")
}
