//! The deployment artefacts, checked with the real tools: `kubectl kustomize` renders them, every
//! object round-trips through its Kubernetes type, alerts pass `promtool check rules`, and the
//! dashboard and alerts only query metrics the code registers.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn rendered() -> Vec<Value> {
    kustomize(&root().join("manifests"))
}

/// `kubectl kustomize DIR`, every document as JSON.
fn kustomize(dir: &Path) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl is installed");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| {
            let v = serde_yaml_ng::Value::deserialize(d).unwrap();
            serde_json::to_value(v).unwrap()
        })
        .collect()
}

use serde::Deserialize as _;

/// Deserializes into the typed object and back; any field the type does not know (a typo, a
/// field at the wrong level) is dropped on the way and makes the round trip differ.
fn round_trip<T: DeserializeOwned + Serialize>(v: &Value) {
    let typed: T = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{} {}: {e}", v["kind"], v["metadata"]["name"]));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        &normalize(back),
        &normalize(v.clone()),
        "{} {} has fields its type does not know",
        v["kind"],
        v["metadata"]["name"]
    );
}

/// Numbers compared as f64 (YAML 1000.0 vs 1000), empty maps/arrays treated as absent.
fn normalize(v: Value) -> Value {
    match v {
        Value::Number(n) => serde_json::json!(n.as_f64()),
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| (k, normalize(v)))
                .filter(|(_, v)| !matches!(v, Value::Null))
                .filter(|(_, v)| !matches!(v, Value::Object(o) if o.is_empty()))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(normalize).collect()),
        other => other,
    }
}

#[test]
fn kustomization_renders_valid_objects_of_every_kind() {
    let objects = rendered();
    let mut kinds = BTreeSet::new();
    for v in &objects {
        let kind = v["kind"].as_str().unwrap().to_string();
        match kind.as_str() {
            "Namespace" => round_trip::<Namespace>(v),
            "ServiceAccount" => round_trip::<ServiceAccount>(v),
            "ClusterRole" => round_trip::<ClusterRole>(v),
            "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(v),
            "Role" => round_trip::<Role>(v),
            "RoleBinding" => round_trip::<RoleBinding>(v),
            "Deployment" => round_trip::<Deployment>(v),
            "PodDisruptionBudget" => round_trip::<PodDisruptionBudget>(v),
            "Service" => round_trip::<Service>(v),
            "CustomResourceDefinition" => round_trip::<CustomResourceDefinition>(v),
            other => panic!("unexpected kind {other}"),
        }
        kinds.insert(kind);
    }
    assert_eq!(kinds.len(), 10, "{kinds:?}");
}

#[test]
fn the_controller_runs_hardened() {
    let objects = rendered();
    let d = objects.iter().find(|v| v["kind"] == "Deployment").unwrap();
    let d: Deployment = serde_json::from_value(d.clone()).unwrap();
    let spec = d.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.unwrap();
    let psc = pod.security_context.unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    let c = &pod.containers[0];
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.unwrap().drop.unwrap(),
        vec!["ALL".to_string()]
    );
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|g| g.path.clone())
    };
    assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/healthz"));
    assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/readyz"));
    let res = c.resources.clone().unwrap();
    assert!(res.requests.is_some() && res.limits.is_some());
    assert!(objects.iter().any(|v| v["kind"] == "PodDisruptionBudget"));

    // The container runs a command this binary accepts (clap checks every flag before --help),
    // with the pod identity the Lease and Events need.
    let args = c.args.clone().unwrap();
    assert_eq!(args[0], "run");
    let out = Command::new(env!("CARGO_BIN_EXE_fleetlb"))
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fleetlb {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The autoscaler's peers: a headless Service over these pods' admin port, named in --peers.
    let peers = args
        .iter()
        .position(|a| a == "--peers")
        .map(|i| args[i + 1].clone())
        .expect("the replicas read each other's load (--peers)");
    let (name, port) = peers.rsplit_once(':').unwrap();
    let svc = objects
        .iter()
        .find(|v| v["kind"] == "Service" && v["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("--peers {peers} names no Service"));
    let svc: Service = serde_json::from_value(svc.clone()).unwrap();
    let svc = svc.spec.unwrap();
    assert_eq!(
        svc.cluster_ip.as_deref(),
        Some("None"),
        "{name} must be headless: its name resolves to every replica"
    );
    // Only fleetlb's proxies are peers: the selector names more than the name label any pod
    // of the app may carry.
    let labels = spec.template.metadata.clone().unwrap().labels.unwrap();
    let selector = svc.selector.unwrap();
    assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
    assert_eq!(
        selector
            .get("app.kubernetes.io/component")
            .map(String::as_str),
        Some("proxy")
    );
    let p = svc.ports.unwrap();
    let admin = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("admin"))
        .unwrap();
    // A headless Service's name resolves to pod addresses: the port in --peers is the
    // container's own (targetPort is not applied).
    assert_eq!(
        admin.container_port.to_string(),
        port,
        "--peers {peers} must name the admin container port"
    );
    assert!(
        p.iter().any(|p| p.port.to_string() == port),
        "{name}:{port}"
    );
    assert_eq!(
        svc.publish_not_ready_addresses,
        Some(true),
        "a draining replica still carries requests: its load counts"
    );
    let env: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert!(
        env.contains(&"POD_NAME") && env.contains(&"POD_NAMESPACE"),
        "{env:?}"
    );
}

/// `manifests/` with the `tls` component, rendered by kubectl from an overlay (as a user would).
fn rendered_with_tls() -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("manifests");
    let status = Command::new("cp")
        .args(["-r"])
        .arg(root().join("manifests"))
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    let overlay = dir.path().join("overlay");
    std::fs::create_dir(&overlay).unwrap();
    std::fs::write(
        overlay.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [../manifests]\ncomponents: [../manifests/tls]\n",
    )
    .unwrap();
    kustomize(&overlay)
}

#[test]
fn the_tls_component_serves_https_from_a_mounted_secret_without_secret_access() {
    let objects = rendered_with_tls();
    let d = objects.iter().find(|v| v["kind"] == "Deployment").unwrap();
    let d: Deployment = serde_json::from_value(d.clone()).unwrap();
    let pod = d.spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap();
    // The binary accepts the arguments (flag names and values; the files exist only in a pod).
    let out = Command::new(env!("CARGO_BIN_EXE_fleetlb"))
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}");
    let arg = |flag: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("{flag}=")))
            .unwrap_or_else(|| panic!("no {flag} in {args:?}"))
            .to_string()
    };
    let (cert, key) = (arg("--tls-cert"), arg("--tls-key"));
    let port: i32 = arg("--tls-listen")
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // The Secret's files, where the arguments look for them, readable by fleetlb's user only.
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "tls")
        .unwrap();
    assert_eq!(mount.read_only, Some(true));
    assert_eq!(cert, format!("{}/tls.crt", mount.mount_path));
    assert_eq!(key, format!("{}/tls.key", mount.mount_path));
    let vol = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "tls")
        .unwrap();
    assert_eq!(
        vol.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("fleetlb-tls")
    );
    let psc = pod.security_context.unwrap();
    assert_eq!(
        psc.fs_group, psc.run_as_user,
        "the Secret's group is fleetlb's user"
    );
    assert!(
        c.ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some("https") && p.container_port == port)
    );
    // The Service takes 443 to it, and redirects to HTTPS name that port.
    let svc = objects
        .iter()
        .find(|v| v["kind"] == "Service" && v["metadata"]["name"] == "fleetlb")
        .unwrap();
    let public: u16 = arg("--tls-public-port").parse().unwrap();
    assert!(
        svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == public && p["targetPort"] == "https"),
        "{svc}"
    );
    // And RBAC is what it was: no Secret access.
    let rbac = |objs: &[Value]| -> Vec<Value> {
        objs.iter()
            .filter(|v| v["kind"].as_str().is_some_and(|k| k.contains("Role")))
            .cloned()
            .collect()
    };
    assert_eq!(rbac(&objects), rbac(&rendered()));
}

#[test]
fn rbac_grants_only_what_the_controller_needs() {
    for v in rendered() {
        let rules = match v["kind"].as_str() {
            Some("ClusterRole") | Some("Role") => v["rules"].as_array().unwrap().clone(),
            _ => continue,
        };
        for r in rules {
            let resources: Vec<&str> = r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap())
                .collect();
            let verbs: Vec<&str> = r["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap())
                .collect();
            assert!(
                !verbs.contains(&"*") && !resources.contains(&"*"),
                "wildcard in {r}"
            );
            assert!(!resources.contains(&"secrets"), "secrets access in {r}");
            assert!(
                !verbs.contains(&"delete"),
                "the controller never deletes Kubernetes objects: {r}"
            );
            if resources.contains(&"leases") {
                assert_eq!(v["kind"], "Role", "leases only in fleetlb's own namespace");
            }
            if resources.contains(&"namespaces") {
                assert_eq!(verbs, ["get"], "{r}");
                assert_eq!(
                    r["resourceNames"],
                    serde_json::json!(["kube-system"]),
                    "only kube-system's UID is read: {r}"
                );
            }
        }
    }
}

fn registered_metric_names() -> BTreeSet<String> {
    let registry = prometheus::Registry::new();
    let mut names: BTreeSet<String> = fleetlb_dataplane::Metrics::new(&registry)
        .unwrap()
        .names()
        .into_iter()
        .collect();
    names.extend(
        fleetlb_controller::metrics::Metrics::new(&registry)
            .unwrap()
            .names(),
    );
    names
}

/// Metric names in a PromQL expression (`fleetlb_*`, with histogram suffixes removed).
fn queried(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("fleetlb_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &expr[start..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.push(base.to_string());
        i = end;
    }
    out
}

#[test]
fn dashboard_queries_only_metrics_the_code_exports() {
    let names = registered_metric_names();
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("manifests/monitoring/dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut seen = 0;
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            for m in queried(t["expr"].as_str().unwrap()) {
                assert!(
                    names.contains(&m),
                    "dashboard panel {:?} queries {m}, which fleetlb does not export",
                    p["title"]
                );
                seen += 1;
            }
        }
    }
    assert!(seen >= 12, "the dashboard queries too little: {seen}");
}

#[test]
fn alert_rules_pass_promtool_and_use_exported_metrics() {
    let names = registered_metric_names();
    let text =
        std::fs::read_to_string(root().join("manifests/monitoring/prometheusrule.yaml")).unwrap();
    let rule: Value =
        serde_json::to_value(serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&text).unwrap())
            .unwrap();
    let spec = &rule["spec"];
    for g in spec["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            // Each alert names its runbook, a page of its own that exists.
            let alert = r["alert"].as_str().unwrap();
            let runbook = r["annotations"]["runbook_url"]
                .as_str()
                .unwrap_or_else(|| panic!("alert {alert} has no runbook_url"));
            let page = std::fs::read_to_string(root().join(runbook))
                .unwrap_or_else(|e| panic!("alert {alert}: runbook {runbook}: {e}"));
            assert!(
                page.starts_with(&format!("# {alert}\n")),
                "{runbook} is not {alert}'s runbook"
            );
            for m in queried(r["expr"].as_str().unwrap()) {
                assert!(
                    names.contains(&m),
                    "alert {} uses {m}, which fleetlb does not export",
                    r["alert"]
                );
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, serde_yaml_ng::to_string(spec).unwrap()).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool is installed (Debian package `prometheus`; .ci/run installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_shipped_iam_policy_is_the_generated_one() {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetlb"))
        .args(["iam-policy", "--controller-id", "CONTROLLER_ID"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let shipped = std::fs::read_to_string(root().join("manifests/iam-policy.json")).unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        shipped,
        "manifests/iam-policy.json is stale: fleetlb iam-policy --controller-id CONTROLLER_ID > manifests/iam-policy.json"
    );
}

#[test]
fn iam_policy_scopes_mutations_to_owned_instances() {
    let policy: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("manifests/iam-policy.json")).unwrap(),
    )
    .unwrap();
    let statements = policy["Statement"].as_array().unwrap();
    let find = |action: &str| -> Vec<&Value> {
        statements
            .iter()
            .filter(|s| match &s["Action"] {
                Value::String(a) => a == action,
                Value::Array(a) => a.iter().any(|x| x == action),
                _ => false,
            })
            .collect()
    };
    for s in find("ec2:TerminateInstances") {
        assert_eq!(
            s["Condition"]["StringEquals"]["aws:ResourceTag/fleetlb.dev/controller"],
            "CONTROLLER_ID",
            "terminate not scoped to this install: {s}"
        );
    }
    for s in find("ec2:CreateTags") {
        assert!(
            s["Condition"]
                .to_string()
                .contains("\"ec2:CreateAction\":\"RunInstances\""),
            "CreateTags outside launches: {s}"
        );
    }
    let run = find("ec2:RunInstances");
    assert!(run.iter().any(|s| {
        s["Condition"]
            .to_string()
            .contains("aws:RequestTag/fleetlb.dev/controller")
    }));
    for s in find("iam:PassRole") {
        assert_ne!(s["Resource"], "*", "PassRole must name the instance role");
    }
    for s in statements {
        let actions = s["Action"].to_string();
        assert!(
            !actions.contains("ec2:*") && !actions.contains("\"*\""),
            "wildcard action: {s}"
        );
    }
}

#[test]
fn the_documented_autoscaler_targets_the_scale_subresource_fleetlb_serves() {
    use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
    let text = std::fs::read_to_string(root().join("examples/autoscaling/hpa.yaml")).unwrap();
    let readme = std::fs::read_to_string(root().join("docs/concepts/autoscaling.md")).unwrap();
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        readme.contains(&body),
        "docs/concepts/autoscaling.md shows examples/autoscaling/hpa.yaml (without its comments)"
    );
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let v = serde_json::to_value(yaml).unwrap();
    round_trip::<HorizontalPodAutoscaler>(&v);
    // What the HPA needs from the target: a scale subresource with replicas paths and a label
    // selector path, and a selector the controller fills in.
    let target = &v["spec"]["scaleTargetRef"];
    assert_eq!(target["apiVersion"], "fleetlb.dev/v1alpha1");
    assert_eq!(target["kind"], "BackendCluster");
    let crd = rendered()
        .into_iter()
        .find(|o| o["kind"] == "CustomResourceDefinition")
        .unwrap();
    let scale = &crd["spec"]["versions"][0]["subresources"]["scale"];
    assert_eq!(scale["specReplicasPath"], ".spec.replicas");
    assert_eq!(scale["statusReplicasPath"], ".status.replicas");
    assert_eq!(scale["labelSelectorPath"], ".status.selector");
}
