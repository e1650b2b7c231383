//! `spec.provider`: where instances come from.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validate;

/// Exactly one provider must be set.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ProviderSpec {
    /// Real EC2 instances, launched through the EC2 API.
    Aws(AwsProvider),
    /// Local child processes of fleetlb on 127.0.0.1 (the demo); no cloud needed.
    Local(LocalProvider),
    /// A fixed list of `host:port` endpoints that fleetlb balances but does not manage.
    Static(StaticProvider),
}

impl ProviderSpec {
    /// The provider's name as written in YAML (`aws`, `local`, `static`).
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderSpec::Aws(_) => "aws",
            ProviderSpec::Local(_) => "local",
            ProviderSpec::Static(_) => "static",
        }
    }
}

/// EC2 launch parameters.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AwsProvider {
    /// AMI id, e.g. `ami-0abcdef1234567890`: of every instance type, or only of the x86_64 ones
    /// when `arm64ImageId` is set.
    #[schemars(pattern(validate::AMI_PATTERN))]
    pub image_id: String,
    /// AMI of the arm64 (Graviton) types (`t4g`, `m7g`, `c6gn`, ...: a `g` after the
    /// generation digit, and `a1`), one AMI per architecture. Required when `instanceTypes`
    /// lists types of both architectures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(validate::AMI_PATTERN))]
    pub arm64_image_id: Option<String>,
    /// Subnets to spread instances over, round-robin (one per availability zone is typical).
    #[serde(default)]
    #[schemars(length(max = 16))]
    pub subnet_ids: Vec<String>,
    /// Security groups attached to every instance.
    #[serde(default)]
    #[schemars(length(max = 5))]
    pub security_group_ids: Vec<String>,
    /// Instance profile name or ARN passed to the instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam_instance_profile: Option<String>,
    /// EC2 key pair name for SSH access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    /// Bootstrap script. When empty, fleetlb's default bootstraps a small HTTP app like the
    /// original FastAPI one. Never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    pub user_data: Option<String>,
    /// Extra tags put on every instance at creation.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tags: std::collections::BTreeMap<String, String>,
}

impl AwsProvider {
    /// The AMI instances of `instance_type` launch from: `arm64ImageId` for arm64 types when
    /// set, else `imageId`.
    pub fn image_for(&self, instance_type: &str) -> &str {
        match &self.arm64_image_id {
            Some(arm) if is_arm64(instance_type) => arm,
            _ => &self.image_id,
        }
    }
}

/// Whether EC2 instance type `t` is arm64 (Graviton), by its family name: a `g` among the
/// letters after the generation digit (`t4g`, `m7gd`, `c6gn`, `g5g`, `im4gn`, `is4gen`), `a1`
/// or `p6e-gb*`. The same rule as the CRD's CEL check of `instanceTypes`.
pub fn is_arm64(t: &str) -> bool {
    let family = t.split('.').next().unwrap_or_default();
    // `a1`, and the NVIDIA Grace (arm64) hosts of `p6e-gb200`.
    if family == "a1" || family.starts_with("p6e-gb") {
        return true;
    }
    let rest = family.trim_start_matches(|c: char| c.is_ascii_lowercase());
    let prefix = family.len() - rest.len();
    let after = rest.trim_start_matches(|c: char| c.is_ascii_digit());
    prefix > 0
        && after.len() < rest.len()
        && after.bytes().all(|b| b.is_ascii_lowercase())
        && after.contains('g')
        && t.contains('.')
}

/// Local child processes (`fleetlb backend`), for the demo and tests.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalProvider {
    /// Overrides the instance type's service time, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 60000))]
    pub latency_ms: Option<u32>,
}

/// Endpoints fleetlb balances but does not launch.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticProvider {
    /// `host:port` addresses (IP literals or names resolved once per reconcile).
    #[schemars(
        length(min = 1, max = 1000),
        extend("items" = {"type": "string", "maxLength": 261, "pattern": validate::ENDPOINT_PATTERN})
    )]
    pub endpoints: Vec<String>,
}
