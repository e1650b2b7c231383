//! Spec validation from one definition: the CRD's own `openAPIV3Schema` (generated from the
//! types' schemars attributes) and its CEL rules (`x-kubernetes-validations`).
//!
//! The API server enforces that schema for `kubectl apply`; the standalone driver has no API
//! server, and the Kubernetes driver must not trust that the installed CRD is current. Both call
//! [`validate_spec`], which checks the spec against the same generated schema (structure, types,
//! bounds, patterns: JSON Schema draft 4, as the API server reads OpenAPI v3) and evaluates the
//! same CEL rules (kube's `cel` feature), naming the offending field in every error. No rule is
//! written twice.

use std::collections::HashMap;
use std::fmt;
use std::sync::{LazyLock, Mutex};

use kube::CustomResourceExt;
use serde_json::{Value, json};

use crate::{BackendCluster, BackendClusterSpec};

/// Route shape: `/` or `/`-separated segments of URL-safe characters, no segment starting with
/// `.` (so no `.` or `..`), no empty segment, no trailing slash.
pub(crate) const ROUTE_PATTERN: &str =
    r"^/([A-Za-z0-9_~-][A-Za-z0-9._~-]*(/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)*)?$";

/// A host name (letters, digits and inner hyphens per label, as RFC 1123) or a wildcard of
/// one leading label (`*.example.com`); case is ignored when matching.
pub(crate) const HOST_PATTERN: &str = r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$";

/// EC2 instance type shape: family, a dot, size (`t2.micro`, `m7g.2xlarge`, `u-6tb1.metal`).
pub(crate) const INSTANCE_TYPE_PATTERN: &str = r"^[a-z][a-z0-9-]*\.[a-z0-9]+$";

/// A `host:port` endpoint: a non-empty host (a name, possibly with a trailing dot or
/// underscores; an IPv4 address; a bracketed IPv6 address, possibly with a zone) and a port from
/// 1 to 65535 (leading zeros allowed).
pub(crate) const ENDPOINT_PATTERN: &str = r"^.+:0*([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$";

/// A health-check path: starts with `/`, no spaces or control characters (UTF-8 allowed).
pub(crate) const HEALTH_PATH_PATTERN: &str = r"^/[^\x00-\x20\x7f]*$";

/// A gRPC service name for the health check: dot-separated identifiers
/// (`fleetlb.demo.Echo`), or empty for the whole server.
pub(crate) const GRPC_SERVICE_PATTERN: &str =
    r"^([A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)?$";

/// An AMI id (EC2 writes them in lowercase; either case is accepted).
pub(crate) const AMI_PATTERN: &str = r"^ami-[0-9a-fA-F]{8,17}$";

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

/// The served version's `openAPIV3Schema` as a JSON Schema validator, and its CEL rules
/// compiled once (compiling them per object cost milliseconds: 10 000 objects took half a
/// minute to load).
struct Schema {
    validator: Option<jsonschema::Validator>,
    cel: Mutex<(kube::core::cel::Validator, kube::core::cel::CompiledSchema)>,
}

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    let crd = serde_json::to_value(BackendCluster::crd()).unwrap_or_default();
    let openapi = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
    let validator = jsonschema::draft4::new(&json_schema(&openapi)).ok();
    let cel = Mutex::new((
        kube::core::cel::Validator::new(),
        kube::core::cel::compile_schema(&openapi),
    ));
    Schema { validator, cel }
});

/// The OpenAPI schema as JSON Schema: `nullable` becomes a null type, and objects with declared
/// properties reject unknown ones (strict field validation, `kubectl apply`'s default).
pub fn json_schema(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = serde_json::Map::new();
            for (k, v) in m {
                if k == "nullable" || k.starts_with("x-kubernetes-") {
                    continue;
                }
                let v = match (k.as_str(), v) {
                    ("properties", Value::Object(props)) => Value::Object(
                        props
                            .iter()
                            .map(|(k, v)| (k.clone(), json_schema(v)))
                            .collect(),
                    ),
                    _ => json_schema(v),
                };
                out.insert(k.clone(), v);
            }
            if m.get("nullable") == Some(&Value::Bool(true))
                && let Some(Value::String(t)) = out.get("type").cloned()
            {
                out.insert("type".into(), json!([t, "null"]));
            }
            if m.contains_key("properties")
                && !m.contains_key("additionalProperties")
                && m.get("x-kubernetes-preserve-unknown-fields") != Some(&Value::Bool(true))
            {
                out.insert("additionalProperties".into(), Value::Bool(false));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(json_schema).collect()),
        other => other.clone(),
    }
}

/// Every error the API server would give for the object `{spec: ...}` in its JSON form (its
/// `apiVersion`, `kind` and `metadata` are the API server's own business and are ignored), each
/// naming its field (`spec.replicas: 5000 is greater than the maximum of 1000`).
pub fn schema_errors(obj: &Value) -> Vec<FieldError> {
    let mut body = obj.clone();
    if let Some(m) = body.as_object_mut() {
        for k in ["apiVersion", "kind", "metadata", "status"] {
            m.remove(k);
        }
    }
    let Some(validator) = SCHEMA.validator.as_ref() else {
        return vec![FieldError {
            field: "spec".into(),
            message: "the CRD schema does not compile (a fleetlb bug)".into(),
        }];
    };
    let mut blocking = false;
    let mut errors: Vec<FieldError> = validator
        .iter_errors(&body)
        .map(|e| {
            // The API server skips CEL after errors that leave a value of the wrong shape
            // (apiextensions' `hasBlockingErr`): type, required, enum, maxLength, maxItems.
            use jsonschema::error::ValidationErrorKind as K;
            blocking |= matches!(
                e.kind(),
                K::Type { .. }
                    | K::Required { .. }
                    | K::Enum { .. }
                    | K::MaxLength { .. }
                    | K::MaxItems { .. }
            );
            let field = field_path(&e.instance_path().to_string());
            let message = friendly(&field, &e.to_string());
            FieldError { field, message }
        })
        .collect();
    if !blocking
        && let Err(e) = {
            let cel = SCHEMA.cel.lock().unwrap_or_else(|p| p.into_inner());
            cel.0.validate_compiled(&cel.1, &body, None)
        }
    {
        errors.extend(e.into_vec().into_iter().map(|e| FieldError {
            field: e.field_path.trim_start_matches('.').to_string(),
            message: e.message,
        }));
    }
    errors
}

/// A JSON pointer (`/spec/hosts/0`) as the API server names a field (`spec.hosts[0]`).
pub fn field_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').filter(|s| !s.is_empty()) {
        if seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push('[');
            out.push_str(seg);
            out.push(']');
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg.replace("~1", "/").replace("~0", "~"));
        }
    }
    out
}

/// A pattern failure says what the field should look like rather than the regular expression.
fn friendly(field: &str, message: &str) -> String {
    if !message.contains("does not match") {
        // Bounds are integers; the schema writes them as floats (`maximum of 1000.0`).
        return match message.strip_suffix(".0") {
            Some(m) if m.ends_with(|c: char| c.is_ascii_digit()) => m.to_string(),
            _ => message.to_string(),
        };
    }
    let value = message.split(" does not match").next().unwrap_or(message);
    let like = if field == "spec.route" {
        "is not a path prefix like /cluster1 (segments of letters, digits, '-', '_', '~', '.', none starting with '.')"
    } else if field == "spec.instanceType" {
        "is not an EC2 instance type like t2.micro"
    } else if field == "spec.provider.aws.imageId" {
        "is not an AMI id like ami-0abc12345"
    } else if field.starts_with("spec.provider.static.endpoints[") {
        "is not host:port (a name, an IPv4 address or a bracketed IPv6 address, port 1-65535)"
    } else if field.starts_with("spec.hosts[") {
        "is not a host name like shop.example.com or a wildcard of one leading label like *.example.com"
    } else if field == "spec.healthCheck.path" {
        "must start with '/' and hold no spaces or control characters"
    } else {
        return message.to_string();
    };
    format!("{value} {like}")
}

/// Verdicts by the spec's JSON text: a check (mostly CEL) costs about 100 µs, and the route
/// table is rebuilt from every object every second.
static VERDICTS: LazyLock<Mutex<HashMap<Digest, Verdict>>> = LazyLock::new(Mutex::default);

/// See [`digest`].
type Digest = (u64, u64, usize);

/// Keys of this process's hash: specs that collide cannot be prepared in advance.
static SEED: LazyLock<std::hash::RandomState> = LazyLock::new(std::hash::RandomState::new);

/// Two independent 64-bit hashes and the length of `text`: a spec can be hundreds of KiB
/// (1000 endpoints, 16 KiB of user data), so the memo keeps this, not the text.
fn digest(text: &str) -> Digest {
    use std::hash::BuildHasher;
    let sip = SEED.hash_one(text);
    let mut fnv: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        fnv ^= u64::from(b);
        fnv = fnv.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (sip, fnv, text.len())
}

/// What [`validate_spec`] says of one spec.
type Verdict = Result<(), Vec<FieldError>>;

/// Specs remembered at most (then the memory starts over): far above the objects one process
/// holds (at 4096, 10 000 objects thrashed it and every spec was checked again every second).
/// About 50 bytes an entry.
const VERDICTS_KEPT: usize = 1 << 17;

/// Checks `spec` against the CRD schema and its CEL rules; returns every problem, each naming
/// its field.
pub fn validate_spec(spec: &BackendClusterSpec) -> Verdict {
    let value = match serde_json::to_value(spec) {
        Ok(v) => v,
        Err(e) => {
            return Err(vec![FieldError {
                field: "spec".into(),
                message: e.to_string(),
            }]);
        }
    };
    let key = digest(&value.to_string());
    let verdicts = || VERDICTS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(v) = verdicts().get(&key) {
        return v.clone();
    }
    let errors = schema_errors(&json!({ "spec": value }));
    let verdict = if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    };
    let mut memo = verdicts();
    if memo.len() >= VERDICTS_KEPT {
        memo.clear();
    }
    memo.insert(key, verdict.clone());
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(patch: Value) -> BackendClusterSpec {
        let mut v = json!({"route": "/c", "replicas": 1, "instanceType": "t2.micro",
                           "provider": {"local": {}}});
        if let (Some(m), Value::Object(p)) = (v.as_object_mut(), patch) {
            m.extend(p);
        }
        serde_json::from_value(v).unwrap()
    }

    fn fields(s: &BackendClusterSpec) -> Vec<String> {
        validate_spec(s)
            .err()
            .unwrap_or_default()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn routes() {
        for ok in ["/", "/cluster1", "/a/b-c/d_e.f", "/v1.2"] {
            assert!(fields(&spec(json!({"route": ok}))).is_empty(), "{ok}");
        }
        for bad in [
            "", "cluster1", "/a/", "//", "/a//b", "/..", "/a/../b", "/.env", "/a b", "/é",
        ] {
            let e = fields(&spec(json!({"route": bad})));
            assert!(
                e.iter().any(|e| e.starts_with("spec.route: ")),
                "{bad}: {e:?}"
            );
        }
        let e = fields(&spec(json!({"route": "/a b"})));
        assert!(
            e[0].contains("is not a path prefix like /cluster1"),
            "{e:?}"
        );
    }

    #[test]
    fn instance_types_endpoints_and_cross_field_rules() {
        for ok in ["t2.micro", "m7g.2xlarge", "u-6tb1.metal"] {
            assert!(
                fields(&spec(json!({"instanceType": ok}))).is_empty(),
                "{ok}"
            );
        }
        for bad in ["t2", "T2.micro", ".micro", "t2.", "t2.mi cro", "2t.micro"] {
            let e = fields(&spec(json!({"instanceType": bad})));
            assert!(
                e.iter().any(|e| e.starts_with("spec.instanceType: ")),
                "{bad}: {e:?}"
            );
        }
        let st = |eps: Value| spec(json!({"provider": {"static": {"endpoints": eps}}}));
        // What the hand-written check accepted before the schema became the one definition.
        let good = json!([
            "10.0.0.1:80",
            "[::1]:8080",
            "web.internal:65535",
            "svc.ns.svc.cluster.local.:80",
            "my_service:080",
            "[fe80::1%eth0]:80"
        ]);
        assert!(fields(&st(good)).is_empty());
        let e = fields(&spec(json!({"healthCheck": {"path": "/santé"}})));
        assert!(e.is_empty(), "{e:?}");
        let e = fields(&spec(json!({"healthCheck": {"path": "/a b"}})));
        assert!(e[0].starts_with("spec.healthCheck.path: "), "{e:?}");
        for bad in ["10.0.0.1", "host:0", "host:65536", ":80", "host:x"] {
            let e = fields(&st(json!([bad])));
            assert!(
                e.iter()
                    .any(|e| e.starts_with("spec.provider.static.endpoints[0]: ")),
                "{bad}: {e:?}"
            );
        }
        let e = fields(&spec(json!({"replicas": 5000})));
        assert_eq!(
            e,
            ["spec.replicas: 5000 is greater than the maximum of 1000"]
        );
        // Autoscaling: at least one instance, and never with listed endpoints.
        let auto = json!({"minReplicas": 0, "maxReplicas": 4});
        let e = fields(&spec(json!({"autoscaling": auto})));
        assert_eq!(
            e,
            ["spec.autoscaling.minReplicas: 0 is less than the minimum of 1"]
        );
        let auto = json!({"minReplicas": 5, "maxReplicas": 4});
        let e = fields(&spec(json!({"autoscaling": auto})));
        assert_eq!(
            e,
            ["spec.autoscaling.minReplicas: minReplicas must not exceed maxReplicas"]
        );
        let e = fields(&spec(json!({
            "autoscaling": {"minReplicas": 1, "maxReplicas": 4},
            "provider": {"static": {"endpoints": ["10.0.0.1:80"]}}
        })));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("spec.autoscaling: autoscaling does not apply to the static provider"),
            "{e:?}"
        );
        // The protocol by ALB's names only, and a gRPC health service as a dotted name.
        for good in ["HTTP1", "HTTP2", "GRPC"] {
            assert!(
                fields(&spec(json!({"protocol": good}))).is_empty(),
                "{good}"
            );
        }
        let hc = |s: &str| spec(json!({"protocol": "GRPC", "healthCheck": {"grpcService": s}}));
        assert!(fields(&hc("fleetlb.demo.Echo")).is_empty());
        assert!(fields(&hc("")).is_empty());
        let e = fields(&hc("a/b"));
        assert!(e[0].starts_with("spec.healthCheck.grpcService: "), "{e:?}");
        // One type, or a list of them: exactly one of the two.
        let e = fields(&spec(json!({"instanceTypes": ["t3.small", "t3.medium"]})));
        assert_eq!(
            e,
            ["spec.instanceType: set instanceType or instanceTypes, exactly one"]
        );
        let mut both = spec(json!({"instanceTypes": ["t3.small"]}));
        both.instance_type = None;
        assert!(fields(&both).is_empty());
        assert_eq!(both.instance_types(), ["t3.small"]);
        both.instance_types.clear();
        assert_eq!(
            fields(&both),
            ["spec.instanceType: set instanceType or instanceTypes, exactly one"]
        );
        let e = fields(&spec(
            json!({"instanceType": null, "instanceTypes": ["t3.small", "bad type"]}),
        ));
        assert!(
            e.iter().any(|e| e.starts_with("spec.instanceTypes[1]: ")),
            "{e:?}"
        );
        // Spot needs EC2.
        let e = fields(&spec(json!({"capacityType": "spot"})));
        assert_eq!(
            e,
            ["spec.capacityType: spot capacity needs the aws provider"]
        );
        let aws = json!({"aws": {"imageId": "ami-0123456789abcdef0"}});
        for c in ["on-demand", "spot", "spot-then-on-demand"] {
            let e = fields(&spec(json!({"capacityType": c, "provider": aws})));
            assert!(e.is_empty(), "{c}: {e:?}");
        }
        // The CEL rule, with the default interval (2 s) filled in.
        let e = fields(&spec(json!({"healthCheck": {"timeoutSeconds": 5}})));
        assert_eq!(
            e,
            ["spec.healthCheck.timeoutSeconds: timeoutSeconds must not exceed intervalSeconds"]
        );
    }

    #[test]
    fn types_of_both_architectures_need_an_arm64_image() {
        let types = |list: &[&str], arm: bool| {
            let mut aws = json!({"imageId": "ami-0123456789abcdef0"});
            if arm {
                aws["arm64ImageId"] = json!("ami-0fedcba9876543210");
            }
            fields(&spec(
                json!({"instanceType": null, "instanceTypes": list, "provider": {"aws": aws}}),
            ))
        };
        assert_eq!(
            types(&["t4g.small", "t3.small"], false),
            [
                "spec.instanceTypes: lists arm64 (Graviton) and x86_64 types: set provider.aws.arm64ImageId, the AMI of the arm64 ones (imageId serves the others)"
            ]
        );
        assert!(types(&["t4g.small", "t3.small"], true).is_empty());
        assert!(types(&["t4g.small", "m7gd.large", "c6gn.xlarge"], false).is_empty());
        assert!(
            types(
                &["t3.small", "g5.xlarge", "g4dn.xlarge", "c6in.large"],
                false
            )
            .is_empty()
        );
        // The Rust rule the launches use agrees with the CEL rule the API server applies.
        let arm = [
            "t4g.small",
            "m7gd.large",
            "c6gn.xlarge",
            "g5g.xlarge",
            "im4gn.large",
            "is4gen.large",
            "x2gd.medium",
            "hpc7g.4xlarge",
            "a1.large",
            "r8g.large",
            "p6e-gb200.36xlarge",
            "i8ge.large",
            "c8gn.large",
        ];
        let x86 = [
            "t3.small",
            "t3a.small",
            "g5.xlarge",
            "g4dn.xlarge",
            "g4ad.xlarge",
            "c6in.large",
            "m5zn.large",
            "gr6.4xlarge",
            "p5en.48xlarge",
            "inf2.xlarge",
            "trn1.2xlarge",
            "u7i-12tb.224xlarge",
            "u-6tb1.metal",
            "c7i-flex.large",
            "trn2u.48xlarge",
            "hpc6a.48xlarge",
            "x2iezn.2xlarge",
            "z1d.large",
            "dl2q.24xlarge",
        ];
        for t in arm {
            assert!(crate::is_arm64(t), "{t}");
            assert!(!types(&[t, "t3.small"], false).is_empty(), "{t} + t3.small");
        }
        for t in x86 {
            assert!(!crate::is_arm64(t), "{t}");
            assert!(types(&[t, "t3.small"], false).is_empty(), "{t} + t3.small");
        }
    }
}
