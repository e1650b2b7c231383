//! Spec validation in code, mirroring the CRD schema.
//!
//! The API server enforces the schema for `kubectl apply`; the standalone driver has no API
//! server, and the Kubernetes driver must not trust that the installed CRD is current. Both call
//! [`validate_spec`], which names the offending field in every error.

use std::fmt;

use crate::{BackendClusterSpec, ProviderSpec};

/// Route shape enforced by the schema: `/` or `/`-separated segments of URL-safe characters,
/// no segment starting with `.` (so no `.` or `..`), no empty segment, no trailing slash.
pub(crate) const ROUTE_PATTERN: &str =
    r"^/([A-Za-z0-9_~-][A-Za-z0-9._~-]*(/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)*)?$";

/// EC2 instance type shape: family, a dot, size (`t2.micro`, `m7g.2xlarge`, `u-6tb1.metal`).
pub(crate) const INSTANCE_TYPE_PATTERN: &str = r"^[a-z][a-z0-9-]*\.[a-z0-9]+$";

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `spec.healthCheck.timeoutSeconds`.
    pub field: String,
    /// What is wrong, in a few words.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn err(errors: &mut Vec<FieldError>, field: &str, message: impl Into<String>) {
    errors.push(FieldError {
        field: field.to_string(),
        message: message.into(),
    });
}

fn route_ok(route: &str) -> bool {
    let Some(rest) = route.strip_prefix('/') else {
        return false;
    };
    if rest.is_empty() {
        return true;
    }
    rest.split('/').all(|seg| {
        let mut chars = seg.chars();
        match chars.next() {
            None | Some('.') => false,
            Some(c) => segment_char(c) && chars.all(|c| c == '.' || segment_char(c)),
        }
    })
}

fn segment_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '~' | '-')
}

fn instance_type_ok(t: &str) -> bool {
    let Some((family, size)) = t.split_once('.') else {
        return false;
    };
    let mut fam = family.chars();
    matches!(fam.next(), Some(c) if c.is_ascii_lowercase())
        && fam.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !size.is_empty()
        && size
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// Checks every rule of the schema plus the rules that span fields. Returns all problems, not
/// just the first, each naming its field.
pub fn validate_spec(spec: &BackendClusterSpec) -> Result<(), Vec<FieldError>> {
    let mut e = Vec::new();
    if spec.route.len() > 256 || !route_ok(&spec.route) {
        err(
            &mut e,
            "spec.route",
            format!(
                "{:?} is not a path prefix like /cluster1 (segments of letters, digits, '-', '_', '~', '.', none starting with '.')",
                spec.route
            ),
        );
    }
    if !(0..=1000).contains(&spec.replicas) {
        err(
            &mut e,
            "spec.replicas",
            format!("must be between 0 and 1000, got {}", spec.replicas),
        );
    }
    if spec.instance_type.len() > 64 || !instance_type_ok(&spec.instance_type) {
        err(
            &mut e,
            "spec.instanceType",
            format!(
                "{:?} is not an EC2 instance type like t2.micro",
                spec.instance_type
            ),
        );
    }
    if !(1..=65535).contains(&spec.port) {
        err(
            &mut e,
            "spec.port",
            format!("must be between 1 and 65535, got {}", spec.port),
        );
    }
    let hc = &spec.health_check;
    if !hc.path.starts_with('/') || hc.path.len() > 1024 {
        err(
            &mut e,
            "spec.healthCheck.path",
            format!("{:?} must start with '/'", hc.path),
        );
    }
    if hc.path.chars().any(|c| c.is_ascii_control() || c == ' ') {
        err(
            &mut e,
            "spec.healthCheck.path",
            "must not contain spaces or control characters",
        );
    }
    if !(1..=300).contains(&hc.interval_seconds) {
        err(
            &mut e,
            "spec.healthCheck.intervalSeconds",
            format!("must be between 1 and 300, got {}", hc.interval_seconds),
        );
    }
    if !(1..=120).contains(&hc.timeout_seconds) {
        err(
            &mut e,
            "spec.healthCheck.timeoutSeconds",
            format!("must be between 1 and 120, got {}", hc.timeout_seconds),
        );
    } else if hc.timeout_seconds > hc.interval_seconds {
        err(
            &mut e,
            "spec.healthCheck.timeoutSeconds",
            format!(
                "must not exceed intervalSeconds ({}), got {}",
                hc.interval_seconds, hc.timeout_seconds
            ),
        );
    }
    for (name, v) in [
        ("spec.healthCheck.healthyThreshold", hc.healthy_threshold),
        (
            "spec.healthCheck.unhealthyThreshold",
            hc.unhealthy_threshold,
        ),
    ] {
        if !(2..=10).contains(&v) {
            err(&mut e, name, format!("must be between 2 and 10, got {v}"));
        }
    }
    if !(1..=3600).contains(&spec.timeout_seconds) {
        err(
            &mut e,
            "spec.timeoutSeconds",
            format!("must be between 1 and 3600, got {}", spec.timeout_seconds),
        );
    }
    if let Some(d) = spec.deregistration_delay_seconds
        && d > 3600
    {
        err(
            &mut e,
            "spec.deregistrationDelaySeconds",
            format!("must be between 0 and 3600, got {d}"),
        );
    }
    let b = &spec.balancing;
    for (name, v, lo, hi) in [
        ("spec.balancing.decaySeconds", b.decay_seconds, 1, 600),
        (
            "spec.balancing.slowStartSeconds",
            b.slow_start_seconds,
            0,
            900,
        ),
        (
            "spec.balancing.maxSharePercent",
            b.max_share_percent,
            100,
            1000,
        ),
        (
            "spec.outlierDetection.consecutiveFailures",
            spec.outlier_detection.consecutive_failures,
            0,
            100,
        ),
        (
            "spec.outlierDetection.latencyFactor",
            spec.outlier_detection.latency_factor,
            0,
            100,
        ),
        (
            "spec.outlierDetection.baseEjectionSeconds",
            spec.outlier_detection.base_ejection_seconds,
            1,
            300,
        ),
        (
            "spec.outlierDetection.maxEjectionPercent",
            spec.outlier_detection.max_ejection_percent,
            0,
            100,
        ),
        (
            "spec.rollout.maxSurgePercent",
            spec.rollout.max_surge_percent,
            0,
            100,
        ),
        (
            "spec.rollout.maxUnavailablePercent",
            spec.rollout.max_unavailable_percent,
            0,
            100,
        ),
    ] {
        if !(lo..=hi).contains(&v) {
            err(
                &mut e,
                name,
                format!("must be between {lo} and {hi}, got {v}"),
            );
        }
    }
    match &spec.provider {
        ProviderSpec::Aws(aws) => {
            let id = aws.image_id.strip_prefix("ami-").unwrap_or("");
            if !(8..=17).contains(&id.len()) || !id.chars().all(|c| c.is_ascii_hexdigit()) {
                err(
                    &mut e,
                    "spec.provider.aws.imageId",
                    format!("{:?} is not an AMI id like ami-0abc12345", aws.image_id),
                );
            }
            if aws.subnet_ids.len() > 16 {
                err(&mut e, "spec.provider.aws.subnetIds", "at most 16 subnets");
            }
            if aws.security_group_ids.len() > 5 {
                err(
                    &mut e,
                    "spec.provider.aws.securityGroupIds",
                    "at most 5 security groups",
                );
            }
            if aws.user_data.as_ref().is_some_and(|u| u.len() > 16384) {
                err(&mut e, "spec.provider.aws.userData", "at most 16 KiB");
            }
        }
        ProviderSpec::Local(local) => {
            if local.latency_ms.is_some_and(|l| l > 60_000) {
                err(
                    &mut e,
                    "spec.provider.local.latencyMs",
                    "must be at most 60000",
                );
            }
        }
        ProviderSpec::Static(st) => {
            if st.endpoints.is_empty() || st.endpoints.len() > 1000 {
                err(
                    &mut e,
                    "spec.provider.static.endpoints",
                    "must list between 1 and 1000 host:port addresses",
                );
            }
            for (i, ep) in st.endpoints.iter().enumerate() {
                let ok = ep
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
                if !ok {
                    err(
                        &mut e,
                        &format!("spec.provider.static.endpoints[{i}]"),
                        format!("{ep:?} is not host:port"),
                    );
                }
            }
        }
    }
    if e.is_empty() { Ok(()) } else { Err(e) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        for ok in ["/", "/cluster1", "/a/b-c/d_e.f", "/v1.2"] {
            assert!(route_ok(ok), "{ok} should be accepted");
        }
        for bad in [
            "", "cluster1", "/a/", "//", "/a//b", "/..", "/a/../b", "/.env", "/a b", "/é",
        ] {
            assert!(!route_ok(bad), "{bad} should be rejected");
        }
    }

    #[test]
    fn instance_types() {
        for ok in ["t2.micro", "m7g.2xlarge", "u-6tb1.metal"] {
            assert!(instance_type_ok(ok), "{ok}");
        }
        for bad in ["t2", "T2.micro", ".micro", "t2.", "t2.mi cro", "2t.micro"] {
            assert!(!instance_type_ok(bad), "{bad}");
        }
    }
}
