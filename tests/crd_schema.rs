//! What the API server would say to each example: every valid example passes the generated CRD's
//! `openAPIV3Schema` (structure, types, bounds, patterns, enums, exactly-one provider, unknown
//! fields rejected as `kubectl apply`'s strict field validation does) and its CEL rules
//! (evaluated by kube's `cel` feature); every invalid one is rejected by the schema, a CEL rule or
//! fleetlb's own validation, with a message naming the field its comment names.

use std::path::{Path, PathBuf};

use serde::Deserialize as _;
use serde_json::{Value, json};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `openAPIV3Schema` of the served version, from `manifests/crd.yaml` as shipped.
fn crd_schema() -> Value {
    let text = std::fs::read_to_string(root().join("manifests/crd.yaml")).unwrap();
    let crd: Value =
        serde_json::to_value(serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&text).unwrap())
            .unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// Every error the API server would return for `obj`, each starting with the field path
/// (`spec.replicas: ...`).
fn api_server_errors(obj: &Value) -> Vec<String> {
    let schema = crd_schema();
    // apiVersion, kind and metadata are validated by the API server itself, not the CRD schema.
    let mut body = obj.clone();
    for k in ["apiVersion", "kind", "metadata"] {
        body.as_object_mut().unwrap().remove(k);
    }
    let validator = jsonschema::draft4::new(&fleetlb_crds::json_schema(&schema))
        .expect("the CRD schema compiles");
    let mut errors: Vec<String> = validator
        .iter_errors(&body)
        .map(|e| {
            let path = fleetlb_crds::field_path(&e.instance_path().to_string());
            format!("{path}: {e}")
        })
        .collect();
    if let Err(e) = kube::core::cel::Validator::new().validate(&schema, &body, None) {
        errors.extend(
            e.into_vec()
                .into_iter()
                .map(|e| format!("{}: {}", e.field_path, e.message)),
        );
    }
    errors
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn documents(path: &Path) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| {
            serde_yaml_ng::Value::deserialize(d)
                .map_err(|e| e.to_string())
                .map(|v| serde_json::to_value(v).unwrap())
        })
        .filter(|d| !matches!(d, Ok(Value::Null)))
        .collect()
}

#[test]
fn every_valid_example_passes_the_schema_and_its_cel_rules() {
    let mut checked = 0;
    for dir in [
        "examples",
        "examples/aws",
        "examples/autoscaled",
        "examples/weighted",
    ] {
        for path in yaml_files(&root().join(dir)) {
            for doc in documents(&path).unwrap() {
                let errors = api_server_errors(&doc);
                assert!(errors.is_empty(), "{}: {errors:?}", path.display());
                checked += 1;
            }
        }
    }
    assert!(checked >= 4, "only {checked} examples found");
}

/// The field an invalid example's comment says must be named (`# fleetlb says: spec.x: ...`).
fn named_field(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let says = text
        .lines()
        .find_map(|l| l.strip_prefix("# fleetlb says: "))
        .unwrap_or_else(|| panic!("{} has no `# fleetlb says:` comment", path.display()));
    says.split(':').next().unwrap().trim().to_string()
}

#[test]
fn every_invalid_example_is_rejected_naming_its_field() {
    let mut checked = 0;
    for path in yaml_files(&root().join("examples/invalid")) {
        let docs = match documents(&path) {
            // Not YAML: kubectl refuses it before any schema.
            Err(_) => {
                checked += 1;
                continue;
            }
            Ok(d) => d,
        };
        let field = named_field(&path);
        for doc in docs {
            let errors = api_server_errors(&doc);
            assert!(
                !errors.is_empty(),
                "{} is accepted by the CRD schema",
                path.display()
            );
            // The API server's message names the field (for `spec:` unknown-field errors, the
            // object holding the typo).
            assert!(
                errors.iter().any(|e| e.starts_with(&field)
                    || e.starts_with(&format!(".{field}"))
                    || e.contains(&format!("{field}."))),
                "{}: no error names {field}: {errors:?}",
                path.display()
            );
            // fleetlb's own loader (standalone mode, and the controller's re-check) agrees and
            // names the same field.
            let text = std::fs::read_to_string(&path).unwrap();
            let load = fleetlb_controller::files::parse_file(
                &path,
                &fleetlb_controller::files::FileText::Text(text),
            );
            let own: Vec<String> = match load.outcome {
                Err(e) => vec![e],
                Ok(docs) => docs.into_iter().filter_map(|d| d.result.err()).collect(),
            };
            assert!(
                own.iter().any(|e| e.contains(&field)),
                "{}: fleetlb says {own:?}",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 7, "only {checked} invalid examples found");
}

#[test]
fn the_cel_rule_compares_timeout_with_interval_including_defaults() {
    let obj = |hc: Value| {
        json!({
            "spec": {"route": "/x", "replicas": 1, "instanceType": "t2.micro",
                     "provider": {"local": {}}, "healthCheck": hc}
        })
    };
    assert!(api_server_errors(&obj(json!({"intervalSeconds": 5, "timeoutSeconds": 5}))).is_empty());
    let errors = api_server_errors(&obj(json!({"intervalSeconds": 2, "timeoutSeconds": 5})));
    assert!(
        errors
            .iter()
            .any(|e| e.contains("timeoutSeconds must not exceed intervalSeconds")),
        "{errors:?}"
    );
    // Only the timeout set: compared against the default interval.
    let errors = api_server_errors(&obj(json!({"timeoutSeconds": 3600})));
    assert!(
        !errors.is_empty(),
        "a timeout far above the default interval is accepted"
    );
}
