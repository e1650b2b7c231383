//! fleetlb against a real Kubernetes API server: the etcd and kube-apiserver of the release
//! pinned in `tests/kube/go.mod`, started on loopback for each test (`tests/support/kube.rs`).
//! The shipped manifests are applied as a user applies them, fleetlb runs as the shipped
//! ServiceAccount with a token from the TokenRequest API (so the real RBAC authorizer judges
//! every call), and what a user sees is read back with the pinned `kubectl`.

#[path = "support/kube.rs"]
mod kube_support;
#[path = "support/moto.rs"]
mod moto_support;
mod support;

use std::collections::BTreeSet;
use std::path::Path;

use kube_support::ControlPlane;
use serde::Deserialize;
use serde_json::Value;
use support::*;

const NS: &str = "fleetlb-system";
const SA_USER: &str = "system:serviceaccount:fleetlb-system:fleetlb";

fn manifests() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("manifests")
        .display()
        .to_string()
}

/// The control plane with fleetlb's CRD, namespace, ServiceAccount and RBAC applied with
/// `kubectl apply -k manifests/`, the CRD established.
fn installed() -> ControlPlane {
    let cp = ControlPlane::start();
    let out = cp.kubectl(&["apply", "--server-side", "-k", &manifests()]);
    assert!(
        out.status.success(),
        "kubectl apply -k manifests/: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    cp.ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/backendclusters.fleetlb.dev",
    ]);
    cp
}

/// `fleetlb run` as the shipped ServiceAccount.
fn run_as_service_account(cp: &ControlPlane, identity: &str) -> Fleetlb {
    run_as_service_account_with(cp, identity, &[])
}

/// [`run_as_service_account`] with more flags.
fn run_as_service_account_with(cp: &ControlPlane, identity: &str, args: &[&str]) -> Fleetlb {
    let kubeconfig = cp.service_account_kubeconfig(NS, "fleetlb");
    let log = std::env::var("FLEETLB_TEST_LOG").unwrap_or_else(|_| "info".into());
    Fleetlb::run(
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("POD_NAMESPACE", NS),
            ("POD_NAME", identity),
            ("RUST_LOG", &log),
        ],
        args,
    )
}

/// A demo instance (`fleetlb backend`) on 127.0.0.1:`port` (0: any), and its address. It
/// exits when the returned child's standard input closes (when it is dropped or killed).
fn backend(cluster: &str, port: u16) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fleetlb"))
        .args(["backend", "--id", "i-static", "--cluster", cluster])
        .args(["--profile", "t2.large", "--exit-on-stdin-eof"])
        .args(["--port", &port.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let Some(addr) = line.trim().strip_prefix("ready ") else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("fleetlb backend on port {port} did not start (its stderr is above)");
    };
    (child, addr.to_string())
}

/// A static BackendCluster `name` on `endpoint`.
fn static_cluster(name: &str, endpoint: &str) -> String {
    format!(
        "apiVersion: fleetlb.dev/v1alpha1\nkind: BackendCluster\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  route: /{name}\n  replicas: 1\n  instanceType: t2.micro\n  provider:\n    static:\n      endpoints: [\"{endpoint}\"]\n"
    )
}

fn json(cp: &ControlPlane, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&cp.ok(&all)).expect("kubectl prints JSON")
}

fn condition(bc: &Value, type_: &str) -> Option<(String, String)> {
    bc["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
}

/// `examples/cluster1.yaml` as `name` on route `/name` with `replicas` instances.
fn cluster(name: &str, replicas: u32) -> String {
    example("cluster1.yaml")
        .replace("name: cluster1", &format!("name: {name}"))
        .replace("route: /cluster1", &format!("route: /{name}"))
        .replace("replicas: 4", &format!("replicas: {replicas}"))
}

/// Waits until BackendCluster `name` (namespace default) is Ready with `replicas` ready.
fn until_ready(cp: &ControlPlane, name: &str, replicas: u32) -> Value {
    until(
        cp,
        &format!("{name} Ready with {replicas} instances"),
        &["get", "bc", name, "-n", "default"],
        |bc| {
            condition(bc, "Ready").is_some_and(|(s, _)| s == "True")
                && bc["status"]["readyReplicas"] == replicas
        },
    )
}

/// Waits until BackendCluster `name` (namespace default) lists `n` instances in its status.
fn with_instances(cp: &ControlPlane, name: &str, n: usize) -> Value {
    until(
        cp,
        &format!("{name} with {n} instances in status"),
        &["get", "bc", name, "-n", "default"],
        |bc| bc["status"]["instances"].as_array().map(Vec::len) == Some(n),
    )
}

/// Polls `kubectl get` of `what` until `ok` holds (deadline: 60 s).
fn until(cp: &ControlPlane, what: &str, args: &[&str], ok: impl Fn(&Value) -> bool) -> Value {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let v = json(cp, args);
        if ok(&v) {
            return v;
        }
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {what}; last seen:\n{}",
            serde_json::to_string_pretty(&v["status"]).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn events_of(cp: &ControlPlane, namespace: &str, name: &str) -> Vec<Value> {
    let v = json(
        cp,
        &[
            "get",
            "events",
            "-n",
            namespace,
            "--field-selector",
            &format!("involvedObject.name={name}"),
        ],
    );
    v["items"].as_array().cloned().unwrap_or_default()
}

/// What fleetlb's user asked the API server, from the audit log: (verb, group/resource[/sub])
/// and the codes it got.
type Calls = (BTreeSet<(String, String)>, Vec<(String, i64)>);

fn calls_of(cp: &ControlPlane, user: &str) -> Calls {
    let mut calls = BTreeSet::new();
    let mut refused = Vec::new();
    for e in cp.audit() {
        // A watch is still open when the log is read: its ResponseStarted entry counts.
        let stage = e["stage"].as_str().unwrap_or_default();
        if e["user"]["username"] != user
            || !(stage == "ResponseComplete" || stage == "ResponseStarted" && e["verb"] == "watch")
        {
            continue;
        }
        let o = &e["objectRef"];
        if o.is_null() {
            continue; // /version and other non-resource URLs
        }
        let mut resource = format!(
            "{}/{}",
            o["apiGroup"].as_str().unwrap_or_default(),
            o["resource"].as_str().unwrap_or_default()
        );
        if let Some(sub) = o["subresource"].as_str() {
            resource = format!("{resource}/{sub}");
        }
        let verb = e["verb"].as_str().unwrap_or_default().to_string();
        let code = e["responseStatus"]["code"].as_i64().unwrap_or_default();
        if code == 401 || code == 403 {
            refused.push((format!("{verb} {resource}"), code));
        }
        calls.insert((verb, resource));
    }
    (calls, refused)
}

/// Every (verb, group/resource) the shipped ClusterRole and Role grant.
fn granted() -> BTreeSet<(String, String)> {
    let text = std::fs::read_to_string(Path::new(&manifests()).join("rbac.yaml")).unwrap();
    let mut out = BTreeSet::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc).unwrap();
        for rule in v["rules"].as_array().into_iter().flatten() {
            for g in rule["apiGroups"].as_array().unwrap() {
                for r in rule["resources"].as_array().unwrap() {
                    for verb in rule["verbs"].as_array().unwrap() {
                        out.insert((
                            verb.as_str().unwrap().to_string(),
                            format!("{}/{}", g.as_str().unwrap(), r.as_str().unwrap()),
                        ));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn a_backend_cluster_lives_its_life_under_the_shipped_rbac() {
    let cp = installed();
    // The Deployment as shipped is accepted by the real API server (admission, schema).
    let deployment = Path::new(&manifests()).join("deployment.yaml");
    cp.ok(&[
        "apply",
        "--dry-run=server",
        "-n",
        NS,
        "-f",
        deployment.to_str().unwrap(),
    ]);

    let f = run_as_service_account(&cp, "fleetlb-0");
    // With two replicas' proxies (leader election on) a retired instance is kept for its whole
    // deregistration delay (30 s by default): shorter here, so the scale-down's wait below
    // stays well inside its deadline.
    let cluster = cluster("cluster1", 3).replace(
        "  deletionPolicy: Delete",
        "  deletionPolicy: Delete\n  deregistrationDelaySeconds: 5",
    );
    assert!(cluster.contains("deregistrationDelaySeconds: 5"));
    cp.applied(&cluster, &["-n", "default"]);

    // Ready, with its instances in status, served through the proxy.
    let bc = until_ready(&cp, "cluster1", 3);
    assert_eq!(
        bc["metadata"]["finalizers"],
        serde_json::json!(["fleetlb.dev/instances"])
    );
    let ids = eventually("/cluster1 served by 3 instances", || {
        f.distinct_instances("/cluster1", 40)
            .filter(|ids| ids.len() == 3)
    });
    assert!(ids.iter().all(|id| id.starts_with("i-")), "{ids:?}");

    // `kubectl get bc` shows the columns the CRD declares.
    let table = cp.ok(&["get", "bc", "-n", "default"]);
    let header = table.lines().next().unwrap_or_default();
    for column in ["NAME", "ROUTE", "DESIRED", "READY"] {
        assert!(header.contains(column), "no {column} column in:\n{table}");
    }
    let row = table.lines().nth(1).unwrap_or_default();
    assert!(
        row.starts_with("cluster1") && row.contains("/cluster1"),
        "{table}"
    );

    // Events, as `kubectl get events` shows them.
    let events = events_of(&cp, "default", "cluster1");
    let launched: Vec<&Value> = events
        .iter()
        .filter(|e| e["reason"] == "Launched")
        .collect();
    assert!(!launched.is_empty(), "no Launched Event in {events:#?}");
    assert!(
        launched.iter().all(|e| e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("launched "))),
        "{launched:#?}"
    );

    // A second object claiming the same route is refused with a Warning; edited while still
    // refused, the same Warning again counts on the first (its series), as kubectl shows.
    let copy = cluster.replace("name: cluster1", "name: copy");
    cp.applied(&copy, &["-n", "default"]);
    until(
        &cp,
        "copy refused",
        &["get", "bc", "copy", "-n", "default"],
        |bc| condition(bc, "Ready").is_some_and(|(s, r)| s == "False" && r == "RouteConflict"),
    );
    cp.ok(&[
        "patch",
        "bc/copy",
        "-n",
        "default",
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":1}}"#,
    ]);
    eventually("the RouteConflict Event counted twice", || {
        events_of(&cp, "default", "copy").into_iter().find(|e| {
            e["reason"] == "RouteConflict" && (e["series"]["count"] == 2 || e["count"] == 2)
        })
    });
    cp.ok(&[
        "delete",
        "bc",
        "copy",
        "-n",
        "default",
        "--wait=true",
        "--timeout=60s",
    ]);

    // The scale subresource: `kubectl scale`, read back with its selector, and an HPA on it.
    cp.ok(&["scale", "bc/cluster1", "-n", "default", "--replicas=2"]);
    until(
        &cp,
        "cluster1 scaled to 2",
        &["get", "bc", "cluster1", "-n", "default"],
        |bc| bc["status"]["readyReplicas"] == 2 && bc["status"]["replicas"] == 2,
    );
    let scale = json(
        &cp,
        &[
            "get",
            "bc",
            "cluster1",
            "-n",
            "default",
            "--subresource=scale",
        ],
    );
    assert_eq!(scale["spec"]["replicas"], 2, "{scale:#}");
    assert!(
        scale["status"]["selector"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "the scale subresource has no status.selector: {scale:#}"
    );
    let hpa = "apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata: {name: cluster1, namespace: default}\nspec:\n  scaleTargetRef: {apiVersion: fleetlb.dev/v1alpha1, kind: BackendCluster, name: cluster1}\n  minReplicas: 1\n  maxReplicas: 5\n  metrics:\n    - type: Resource\n      resource: {name: cpu, target: {type: Utilization, averageUtilization: 50}}\n";
    cp.applied(hpa, &[]);

    // The retired instance stops once drained; deletion waits on the finalizer until every
    // instance is gone.
    eventually("2 instance processes left after scaling down", || {
        (backends_of(f.pid(), Some("cluster1")).len() == 2).then_some(())
    });
    cp.ok(&[
        "delete",
        "bc",
        "cluster1",
        "-n",
        "default",
        "--wait=true",
        "--timeout=90s",
    ]);
    assert!(
        backends_of(f.pid(), Some("cluster1")).is_empty(),
        "instances left after the object was deleted: {:?}",
        backends_of(f.pid(), Some("cluster1"))
    );

    // No write was made from a copy of the object older than this replica's own last write
    // (each would be a 409 and a retry).
    let log = f.log_text();
    assert!(!log.contains("409 Conflict"), "{log}");

    // The real authorizer refused nothing, and the shipped roles grant exactly what was used.
    let (calls, refused) = calls_of(&cp, SA_USER);
    assert!(
        refused.is_empty(),
        "refused: {refused:?}\nlog:\n{}",
        f.log_text()
    );
    let unused: Vec<_> = granted().difference(&calls).cloned().collect();
    assert!(
        unused.is_empty(),
        "granted but never used: {unused:?}\nused: {calls:?}"
    );
}

#[test]
fn fifty_instances_launched_at_once_have_every_event_accepted() {
    let cp = installed();
    let f = run_as_service_account(&cp, "fleetlb-0");
    let cluster = cluster("big", 50);
    cp.applied(&cluster, &["-n", "default"]);
    with_instances(&cp, "big", 50);
    let events = eventually("a Launched Event", || {
        let e = events_of(&cp, "default", "big");
        e.iter().any(|e| e["reason"] == "Launched").then_some(e)
    });
    let launched: Vec<&str> = events
        .iter()
        .filter(|e| e["reason"] == "Launched")
        .filter_map(|e| e["message"].as_str())
        .collect();
    // One note per launch round, each within the API server's limit and saying how many
    // instances it left out; none refused (fleetlb logs a refused Event).
    assert!(
        launched
            .iter()
            .any(|m| m.starts_with("launched 50 ") && m.contains(" more")),
        "{launched:#?}"
    );
    let log = f.log_text();
    assert!(
        !log.contains("cannot publish an Event"),
        "an Event was refused:\n{log}"
    );
    // Scaling down to 45 is a new Event with its own note, not a count on the first one.
    cp.ok(&["scale", "bc/big", "-n", "default", "--replicas=45"]);
    let notes = eventually("a Retiring or Terminated Event", || {
        let e = events_of(&cp, "default", "big");
        e.iter()
            .any(|e| e["reason"] == "Retiring" || e["reason"] == "Terminated")
            .then_some(e)
    });
    let distinct: BTreeSet<&str> = notes.iter().filter_map(|e| e["message"].as_str()).collect();
    assert!(distinct.len() >= 2, "{notes:#?}");
    cp.ok(&[
        "delete",
        "bc",
        "big",
        "-n",
        "default",
        "--wait=true",
        "--timeout=120s",
    ]);
    assert!(backends_of(f.pid(), Some("big")).is_empty());
}

/// Today's CRD with one more spec field, as a newer fleetlb's CRD would have.
fn newer_crd() -> String {
    let text = std::fs::read_to_string(Path::new(&manifests()).join("crd.yaml")).unwrap();
    let mut crd: Value = serde_yaml_ng::from_str(&text).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["futureField"] =
        serde_json::json!({"type": "string"});
    serde_json::to_string(&crd).unwrap()
}

#[test]
fn an_object_using_a_newer_crds_field_is_set_aside_and_the_others_keep_reconciling() {
    let cp = installed();
    let f = run_as_service_account(&cp, "fleetlb-0");
    cp.applied(&cluster("old", 2), &["-n", "default"]);
    until_ready(&cp, "old", 2);

    // A newer CRD is applied before its fleetlb (a rollout), and the object is edited to use
    // its new field, asking for one more instance too.
    cp.applied(&newer_crd(), &["--force-conflicts"]);
    cp.ok(&[
        "patch",
        "bc/old",
        "-n",
        "default",
        "--type=merge",
        "-p",
        r#"{"spec":{"futureField":"on","replicas":3}}"#,
    ]);
    let bc = until(
        &cp,
        "old set aside with UnknownFields",
        &["get", "bc", "old", "-n", "default"],
        |bc| condition(bc, "Ready").is_some_and(|(s, r)| s == "False" && r == "UnknownFields"),
    );
    let ready = bc["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("spec.futureField"),
        "{ready:#}"
    );
    // Left exactly as it is: its instances, its status, its traffic.
    assert_eq!(
        bc["status"]["instances"].as_array().map(Vec::len),
        Some(2),
        "{bc:#}"
    );
    assert_eq!(
        bc["metadata"]["finalizers"],
        serde_json::json!(["fleetlb.dev/instances"])
    );
    eventually("/old still served by its 2 instances", || {
        f.distinct_instances("/old", 20)
            .filter(|ids| ids.len() == 2)
    });

    // Every other object keeps reconciling meanwhile.
    cp.applied(&cluster("other", 1), &["-n", "default"]);
    until_ready(&cp, "other", 1);
    assert_eq!(
        backends_of(f.pid(), Some("old")).len(),
        2,
        "an instance was launched or terminated for the object set aside"
    );
}

/// The field path an error names: `spec.replicas` of `spec.replicas: 5000 is ...`; for an
/// unknown field (`spec: unknown field `replica`, ...`), the field itself (`spec.replica`).
fn path_named(error: &str) -> String {
    // After the file and document it is in (`FILE: BackendCluster NS/NAME (document 1): `).
    let error = error.rsplit_once("): ").map_or(error, |(_, e)| e);
    let (head, rest) = error.split_once(':').unwrap_or((error, ""));
    match rest
        .split_once("unknown field `")
        .and_then(|(_, f)| f.split_once('`'))
    {
        Some((field, _)) if !head.trim().ends_with(&format!(".{field}")) => {
            format!("{}.{field}", head.trim())
        }
        _ => head.trim().to_string(),
    }
}

#[test]
fn every_invalid_example_is_refused_by_the_api_server_and_by_fleetlb_naming_the_same_field() {
    let cp = installed();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut compared = 0;
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let load = fleetlb_controller::files::parse_file(
            path,
            &fleetlb_controller::files::FileText::Text(text),
        );
        let own: Vec<String> = match load.outcome {
            Err(e) => vec![e],
            Ok(docs) => docs.into_iter().filter_map(|d| d.result.err()).collect(),
        };
        assert!(!own.is_empty(), "{}: fleetlb accepts it", path.display());
        // Strict field validation: an unknown field is refused, not pruned.
        let out = cp.kubectl(&[
            "apply",
            "--server-side",
            "--dry-run=server",
            "--validate=strict",
            "-n",
            "default",
            "-f",
            path.to_str().unwrap(),
        ]);
        let said = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success(),
            "{}: the API server accepts it",
            path.display()
        );
        if said.contains("error parsing") || said.contains("yaml:") {
            // Not YAML: refused before any server, by kubectl as by fleetlb.
            continue;
        }
        let field = path_named(&own[0]);
        assert!(
            said.contains(&field),
            "{}: fleetlb names {field} ({own:?}); the API server says: {said}",
            path.display()
        );
        compared += 1;
    }
    assert!(compared >= 7, "only {compared} invalid examples compared");
}

/// A BackendCluster `name` on the aws provider against moto, `replicas` t2.micro.
fn aws_cluster(name: &str, replicas: u32, image: &str, subnet: &str) -> String {
    format!(
        "apiVersion: fleetlb.dev/v1alpha1\nkind: BackendCluster\nmetadata:\n  name: {name}\nspec:\n  route: /{name}\n  replicas: {replicas}\n  instanceType: t2.micro\n  port: 8000\n  provider:\n    aws:\n      imageId: {image}\n      subnetIds: [{subnet}]\n"
    )
}

/// `fleetlb run` as the shipped ServiceAccount, identity `identity`, with the aws provider
/// pointed at `moto`.
fn run_with_moto(cp: &ControlPlane, identity: &str, moto: &moto_support::Moto) -> Fleetlb {
    run_with_moto_args(cp, identity, moto, &[])
}

/// [`run_with_moto`] with more flags, SQS pointed at `moto` too.
fn run_with_moto_args(
    cp: &ControlPlane,
    identity: &str,
    moto: &moto_support::Moto,
    args: &[&str],
) -> Fleetlb {
    let kubeconfig = cp.service_account_kubeconfig(NS, "fleetlb");
    let log = std::env::var("FLEETLB_TEST_LOG").unwrap_or_else(|_| "info".into());
    let mut env: Vec<(&str, String)> = moto.env();
    env.extend([
        ("KUBECONFIG", kubeconfig.to_str().unwrap().to_string()),
        ("POD_NAMESPACE", NS.to_string()),
        ("POD_NAME", identity.to_string()),
        ("RUST_LOG", log),
        ("FLEETLB_SQS_ENDPOINT", moto.url()),
    ]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Fleetlb::run(&env, args)
}

fn lease_holder(cp: &ControlPlane) -> String {
    let lease = json(cp, &["get", "lease", "fleetlb-leader", "-n", NS]);
    lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn ec2_requests(f: &Fleetlb) -> f64 {
    f.metric("fleetlb_controller_ec2_requests_total", &[])
}

/// EC2 calls that change something (launch, terminate, tag).
fn ec2_changes(f: &Fleetlb) -> f64 {
    [
        "RunInstances",
        "TerminateInstances",
        "CreateTags",
        "DeleteTags",
    ]
    .iter()
    .map(|op| {
        f.metric(
            "fleetlb_controller_ec2_requests_total",
            &[("operation", op)],
        )
    })
    .sum()
}

#[test]
fn a_frozen_leader_is_replaced_once_its_lease_expires_and_resumed_calls_no_ec2() {
    let cp = installed();
    let moto = moto_support::Moto::start();
    let (image, subnet) = moto.image_and_subnet();
    let a = run_with_moto(&cp, "fleetlb-a", &moto);
    eventually("fleetlb-a leads", || {
        (lease_holder(&cp) == "fleetlb-a").then_some(())
    });
    let b = run_with_moto(&cp, "fleetlb-b", &moto);
    cp.applied(&aws_cluster("web", 2, &image, &subnet), &["-n", "default"]);
    // Launched on EC2 by the leader, listed in status, told by an Event.
    with_instances(&cp, "web", 2);
    assert_eq!(moto.instances("web", "running").len(), 2);
    eventually("a Launched Event", || {
        events_of(&cp, "default", "web")
            .into_iter()
            .find(|e| e["reason"] == "Launched")
    });
    assert_eq!(ec2_requests(&b), 0.0, "the follower called EC2");

    // The leader freezes (a stalled node, a long GC pause): the other replica takes over
    // once the Lease has expired, and acts on a change made meanwhile.
    let changes_before = ec2_changes(&a);
    assert!(changes_before > 0.0, "fleetlb-a launched nothing");
    a.signal("-STOP");
    cp.ok(&["scale", "bc/web", "-n", "default", "--replicas=3"]);
    eventually("fleetlb-b holds the Lease", || {
        (lease_holder(&cp) == "fleetlb-b").then_some(())
    });
    with_instances(&cp, "web", 3);
    assert_eq!(moto.instances("web", "running").len(), 3);

    // Resumed, the old leader finds its Lease gone before it acts: it launches, terminates
    // and tags nothing (its first moments included), and calls EC2 no more at all.
    a.signal("-CONT");
    eventually("fleetlb-a knows it no longer leads", || {
        (a.metric("fleetlb_leader", &[]) == 0.0).then_some(())
    });
    let before = ec2_requests(&a);
    cp.ok(&["scale", "bc/web", "-n", "default", "--replicas=2"]);
    until(
        &cp,
        "web back to 2 instances (by fleetlb-b)",
        &["get", "bc", "web", "-n", "default"],
        |bc| bc["status"]["replicas"] == 2,
    );
    assert_eq!(
        (ec2_changes(&a), ec2_requests(&a)),
        (changes_before, before),
        "the resumed old leader called EC2; its log:\n{}",
        a.log_text()
    );

    // Deleted: the finalizer holds the object until every instance is terminated on EC2.
    cp.ok(&[
        "delete",
        "bc",
        "web",
        "-n",
        "default",
        "--wait=true",
        "--timeout=120s",
    ]);
    assert!(moto.instances("web", "running").is_empty());
    assert!(moto.instances("web", "pending").is_empty());
}

/// etcd's revision now, from its JSON gateway.
fn etcd_revision(cp: &ControlPlane) -> i64 {
    let url = cp.etcd_url().trim_start_matches("http://").to_string();
    let addr: std::net::SocketAddr = url.parse().expect("etcd's client URL");
    let body = r#"{"key":"AA=="}"#;
    let r = request(
        addr,
        &format!(
            "POST /v3/kv/range HTTP/1.1\r\nHost: etcd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .expect("etcd answers");
    let v: Value = serde_json::from_str(&r.body).expect("JSON");
    v["header"]["revision"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("a revision")
}

/// Compacts etcd's history up to `revision`: watches from before it get 410 Gone.
fn etcd_compact(cp: &ControlPlane, revision: i64) {
    let url = cp.etcd_url().trim_start_matches("http://").to_string();
    let addr: std::net::SocketAddr = url.parse().expect("etcd's client URL");
    let body = format!(r#"{{"revision":"{revision}","physical":true}}"#);
    let r = request(
        addr,
        &format!(
            "POST /v3/kv/compaction HTTP/1.1\r\nHost: etcd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .expect("etcd answers");
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn an_api_server_restart_and_a_compacted_history_lose_no_change() {
    let mut cp = installed();
    let kubeconfig = cp.service_account_kubeconfig(NS, "fleetlb");
    let f = Fleetlb::run(
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("POD_NAMESPACE", NS),
            ("RUST_LOG", "info"),
        ],
        &["--no-leader-election"],
    );
    cp.applied(&cluster("web", 1), &["-n", "default"]);
    until_ready(&cp, "web", 1);

    // The API server restarts under the open watch; a change made after it comes back
    // reaches fleetlb.
    cp.restart_apiserver();
    cp.ok(&["scale", "bc/web", "-n", "default", "--replicas=2"]);
    until_ready(&cp, "web", 2);

    // fleetlb is held still while changes happen and etcd's history is compacted past
    // them, and the API server restarts (its watch cache starts afresh): fleetlb's watch
    // resumes from a version that is gone (410 Gone), relists, and misses nothing.
    let lists_before = calls_of_verb(&cp, "list");
    f.signal("-STOP");
    cp.ok(&["scale", "bc/web", "-n", "default", "--replicas=3"]);
    cp.ok(&[
        "annotate",
        "bc/web",
        "-n",
        "default",
        "fleetlb.dev/test=compacted",
    ]);
    etcd_compact(&cp, etcd_revision(&cp));
    cp.restart_apiserver();
    f.signal("-CONT");
    until_ready(&cp, "web", 3);
    assert!(
        calls_of_verb(&cp, "list") > lists_before,
        "fleetlb did not list BackendClusters again"
    );
    assert_eq!(backends_of(f.pid(), Some("web")).len(), 3);
}

/// How many `verb` calls fleetlb's ServiceAccount made on backendclusters (audit log).
fn calls_of_verb(cp: &ControlPlane, verb: &str) -> usize {
    cp.audit()
        .iter()
        .filter(|e| {
            e["user"]["username"] == SA_USER
                && e["stage"] == "ResponseComplete"
                && e["verb"] == verb
                && e["objectRef"]["resource"] == "backendclusters"
        })
        .count()
}

/// CPU seconds (user + system) process `pid` has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name's closing parenthesis: utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// 1000 BackendClusters applied at once (static provider, one healthy endpoint each): all
/// become Ready. The time it takes and fleetlb's CPU meanwhile are printed for
/// docs/operations.md (`cargo test --test kube_apiserver -- thousand --nocapture`;
/// `FLEETLB_TEST_OBJECTS=N` for another number). Before the fix, 511 of 1000 were Ready after
/// ten minutes: the route table was rebuilt from every object at the start of every reconcile
/// (O(n^2)), and a new static object's first reconcile could read a listing made before it
/// existed and then wait out the sync period with no instances.
#[test]
fn a_thousand_backend_clusters_applied_at_once_all_become_ready() {
    let n = std::env::var("FLEETLB_TEST_OBJECTS")
        .ok()
        .and_then(|v| v.parse().ok());
    let n: usize = n.unwrap_or(1000);
    let cp = installed();
    let (mut backend, addr) = backend("many", 0);
    let f = run_as_service_account(&cp, "fleetlb-0");
    let docs: Vec<String> = (0..n)
        .map(|i| static_cluster(&format!("c{i}"), &addr))
        .collect();
    let (cpu0, t0) = (cpu_seconds(f.pid()), std::time::Instant::now());
    cp.applied(&docs.join("---\n"), &[]);
    let applied = t0.elapsed();
    let end = t0 + std::time::Duration::from_secs(300);
    let ready = loop {
        let all = json(&cp, &["get", "bc", "-n", "default"]);
        let ready = all["items"].as_array().map_or(0, |items| {
            items
                .iter()
                .filter(|bc| condition(bc, "Ready").is_some_and(|(s, _)| s == "True"))
                .count()
        });
        if ready == n {
            break ready;
        }
        assert!(
            std::time::Instant::now() < end,
            "only {ready} of {n} Ready after 5 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let (took, cpu) = (t0.elapsed(), cpu_seconds(f.pid()) - cpu0);
    eprintln!(
        "{ready} BackendClusters: applied in {:.1} s, all Ready {:.1} s after the apply began; fleetlb used {cpu:.1} CPU-seconds meanwhile ({:.0} % of one core)",
        applied.as_secs_f64(),
        took.as_secs_f64(),
        100.0 * cpu / took.as_secs_f64()
    );
    // Every one is served.
    assert_eq!(
        get(f.proxy, &format!("/c{}", n - 1)).map(|r| r.status),
        Some(200)
    );
    let log = f.log_text();
    assert!(!log.contains("409 Conflict"), "{log}");
    let _ = backend.kill();
    let _ = backend.wait();
}

/// An endpoint's health reaches status when it changes, not at the next sync period (an hour
/// here): a static endpoint with nothing listening is `HealthCheckFailing`; once a server
/// answers there the object turns Ready, and when it stops, not Ready again.
#[test]
fn an_endpoint_turning_healthy_or_sick_is_in_status_at_once() {
    let cp = installed();
    let port = free_port();
    let f = run_as_service_account_with(&cp, "fleetlb-0", &["--sync-period", "60m"]);
    cp.applied(&static_cluster("flip", &format!("127.0.0.1:{port}")), &[]);
    let ready_is = |want: &str, reason: &str| {
        until(
            &cp,
            &format!("flip Ready={want} ({reason})"),
            &["get", "bc", "flip", "-n", "default"],
            |bc| condition(bc, "Ready").is_some_and(|(s, r)| s == want && r == reason),
        )
    };
    ready_is("False", "HealthCheckFailing");
    let (mut server, _) = backend("flip", port);
    ready_is("True", "AllReplicasReady");
    assert_eq!(get(f.proxy, "/flip").map(|r| r.status), Some(200));
    let _ = server.kill();
    let _ = server.wait();
    ready_is("False", "HealthCheckFailing");
}

/// The interruption queue in Kubernetes mode: a spot interruption warning on the queue (moto's
/// SQS) has the leader reconcile the instance's object at once (the sync period is an hour):
/// the instance leaves `status.endpoints`, the path every proxy replica follows, a
/// replacement becomes ready, an `Interrupted` Event reaches the API server, and the message
/// is deleted.
#[test]
fn an_interruption_warning_drains_and_replaces_an_instance_through_the_status() {
    let cp = installed();
    let moto = moto_support::Moto::start();
    let queue = "fleetlb-interruptions";
    let url = moto_support::Moto::values(
        &moto.sqs(&format!("Action=CreateQueue&QueueName={queue}")),
        "QueueUrl",
    )
    .pop()
    .expect("a queue URL");
    let f = run_with_moto_args(
        &cp,
        "fleetlb-0",
        &moto,
        &["--interruption-queue", queue, "--sync-period", "60m"],
    );
    // A short deregistration delay: with several proxy replicas a retired instance is
    // terminated after the whole delay (default 300 s), and the message is deleted then (on
    // EC2, AWS reclaims a warned spot instance after two minutes anyway).
    let web = cluster("web", 2).replace(
        "  deletionPolicy: Delete",
        "  deletionPolicy: Delete\n  deregistrationDelaySeconds: 5",
    );
    cp.applied(&web, &["-n", "default"]);
    let bc = until_ready(&cp, "web", 2);
    let endpoint_ids = |bc: &Value| -> Vec<String> {
        bc["status"]["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["id"].as_str().map(String::from))
            .collect()
    };
    let before = endpoint_ids(&bc);
    let victim = before[0].clone();
    let warning = serde_json::json!({
        "version": "0", "id": "5d6e1f0a-0b3c-4d2e-8f1a-2b3c4d5e6f70",
        "detail-type": "EC2 Spot Instance Interruption Warning", "source": "aws.ec2",
        "account": "123456789012", "time": "2026-12-06T12:00:00Z", "region": "us-east-1",
        "resources": [], "detail": {"instance-id": victim, "instance-action": "terminate"},
    });
    moto.sqs(&format!(
        "Action=SendMessage&QueueUrl={}&MessageBody={}",
        moto_support::Moto::encode(&url),
        moto_support::Moto::encode(&warning.to_string())
    ));
    until(
        &cp,
        "the victim out of the endpoints and a replacement ready",
        &["get", "bc", "web", "-n", "default"],
        |bc| {
            let ids = endpoint_ids(bc);
            bc["status"]["readyReplicas"] == 2 && ids.len() == 2 && !ids.contains(&victim)
        },
    );
    eventually("the Interrupted Event", || {
        events_of(&cp, "default", "web")
            .iter()
            .any(|e| {
                e["reason"] == "Interrupted"
                    && e["type"] == "Warning"
                    && e["message"]
                        .as_str()
                        .or(e["note"].as_str())
                        .is_some_and(|m| {
                            m.starts_with(&format!("{victim}: a spot interruption warning"))
                        })
            })
            .then_some(())
    });
    eventually("the message deleted", || {
        let xml = moto.sqs(&format!(
            "Action=GetQueueAttributes&QueueUrl={}&AttributeName.1=All",
            moto_support::Moto::encode(&url)
        ));
        let left: u64 = xml
            .split("<Attribute>")
            .skip(1)
            .filter(|a| a.contains("<Name>ApproximateNumberOfMessages"))
            .filter_map(|a| {
                moto_support::Moto::values(a, "Value")
                    .first()?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        (left == 0).then_some(())
    });
    assert_eq!(
        f.metric(
            "fleetlb_controller_interruption_messages_total",
            &[("kind", "spot_interruption")]
        ),
        1.0
    );
}
