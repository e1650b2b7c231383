//! The instance model every provider reports: ids, EC2-shaped states, ownership, drift.

use std::net::SocketAddr;
use std::time::SystemTime;

use fleetlb_crds::{BackendCluster, ProviderSpec};

use super::{ClusterKey, ProviderKind, spec_hash};

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

/// An instance's configuration as the provider reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaunchedAs {
    /// Machine image.
    pub image_id: Option<String>,
    /// Subnet.
    pub subnet_id: Option<String>,
    /// Security groups, sorted.
    pub security_groups: Vec<String>,
    /// Availability zone (EC2's placement), for zone-aware routing.
    pub zone: Option<String>,
    /// A spot instance (EC2's `instanceLifecycle`).
    pub spot: bool,
}

impl Instance {
    /// Its availability zone, when the provider reports one.
    pub fn zone(&self) -> Option<String> {
        self.launched_as.as_ref().and_then(|l| l.zone.clone())
    }

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
        if !self.instance_type.is_empty()
            && self.provider != ProviderKind::Static
            && !bc
                .spec
                .instance_types()
                .contains(&self.instance_type.as_str())
        {
            return Some(format!("instance type is {}", self.instance_type));
        }
        let (ProviderSpec::Aws(aws), Some(seen)) = (&bc.spec.provider, &self.launched_as) else {
            return None;
        };
        let want = aws.image_for(&self.instance_type);
        if let Some(image) = &seen.image_id
            && image != want
        {
            return Some(format!("image is {image}, not {want}"));
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
