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
    /// AMI id, e.g. `ami-0abcdef1234567890`.
    #[schemars(pattern(validate::AMI_PATTERN))]
    pub image_id: String,
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
