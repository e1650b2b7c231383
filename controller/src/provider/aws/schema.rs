//! The tag schema fleetlb puts on every instance at launch, and the instance model read back
//! from EC2's description of an instance.

use std::net::SocketAddr;
use std::time::SystemTime;

use aws_sdk_ec2::types::{InstanceStateName, Tag};

use crate::provider::{ClusterKey, Instance, InstanceState, LaunchedAs, ProviderKind};

/// Tag keys fleetlb puts on every instance.
pub mod keys {
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

pub(super) fn tag(k: &str, v: &str) -> Tag {
    Tag::builder().key(k).value(v).build()
}

pub(super) fn tag_of<'a>(i: &'a aws_sdk_ec2::types::Instance, key: &str) -> Option<&'a str> {
    i.tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

pub(super) fn to_instance(i: &aws_sdk_ec2::types::Instance, controller: &str) -> Option<Instance> {
    if tag_of(i, keys::CONTROLLER) != Some(controller) {
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
    let port: u16 = tag_of(i, keys::PORT)
        .and_then(|p| p.parse().ok())
        .unwrap_or(8000);
    let address = i
        .private_ip_address()
        .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, port));
    Some(Instance {
        id: i.instance_id()?.to_string(),
        owner: ClusterKey {
            namespace: tag_of(i, keys::NAMESPACE)?.to_string(),
            name: tag_of(i, keys::NAME)?.to_string(),
        },
        owner_uid: tag_of(i, keys::UID).unwrap_or("").to_string(),
        slot: tag_of(i, keys::SLOT)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        attempt: tag_of(i, keys::ATTEMPT)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        address,
        state,
        instance_type: i
            .instance_type()
            .map(|t| t.as_str().to_string())
            .unwrap_or_default(),
        spec_hash: tag_of(i, keys::SPEC_HASH).unwrap_or("").to_string(),
        launched_at: i
            .launch_time()
            .and_then(|t| SystemTime::try_from(*t).ok())
            .unwrap_or(SystemTime::UNIX_EPOCH),
        launched_as: Some(LaunchedAs {
            image_id: i.image_id().map(String::from),
            subnet_id: i.subnet_id().map(String::from),
            spot: i.instance_lifecycle() == Some(&aws_sdk_ec2::types::InstanceLifecycleType::Spot),
            zone: i
                .placement()
                .and_then(|p| p.availability_zone())
                .map(String::from),
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
