//! One scenario table through both drivers: the same objects and the same provider behaviour
//! give the same conditions and the same Events, whether the objects come from YAML files
//! (standalone, Events in `/status`) or from the API server (Kubernetes, against an API server
//! that accepts every write and records it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fleetlb_controller::Providers;
use fleetlb_controller::core::Core;
use fleetlb_controller::error::ErrorClass;
use fleetlb_controller::kubernetes::{self, Context, FINALIZER, KubeConfig, Wiring};
use fleetlb_controller::metrics::Metrics;
use fleetlb_controller::standalone::{Outputs, Standalone, StandaloneConfig};
use fleetlb_crds::BackendCluster;
use fleetlb_dataplane::{Dataplane, ProxyConfig, RouteTable};
use kube::runtime::events::Reporter;
use kube::runtime::{reflector, watcher};
use serde_json::{Value, json};
use tokio::sync::watch;

mod support;
use support::fake::{self, Fake};

/// What a user must see of one object: its name, (condition type, status, reason) that must
/// be present (an empty reason: any), and its Event reasons in order.
type Expect = (
    &'static str,
    &'static [(&'static str, &'static str, &'static str)],
    &'static [&'static str],
);

/// One scenario: objects (name, route, provider kind, oldest first) and the provider's faults.
struct Scenario {
    name: &'static str,
    objects: &'static [(&'static str, &'static str, &'static str)],
    list_fails: Option<ErrorClass>,
    launch_fails: Option<ErrorClass>,
    /// What a user must see, per object.
    expect: &'static [Expect],
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        // No load measured yet: the floor, max(minReplicas, replicas), recorded in status.
        name: "an autoscaled object records its count",
        objects: &[("auto", "/auto", "local-autoscaled")],
        list_fails: None,
        launch_fails: None,
        expect: &[("auto", &[("Degraded", "False", "")], &["Launched"])],
    },
    Scenario {
        name: "a new object launches its instances",
        objects: &[("web", "/web", "local")],
        list_fails: None,
        launch_fails: None,
        expect: &[("web", &[("Degraded", "False", "")], &["Launched"])],
    },
    Scenario {
        // "b" is the older (listed first: the earlier file, the earlier creation time), so the
        // route does not go to the first by name.
        name: "the older object keeps a contested route",
        objects: &[("b", "/shop", "local"), ("a", "/shop", "local")],
        list_fails: None,
        launch_fails: None,
        expect: &[
            ("b", &[("Degraded", "False", "")], &["Launched"]),
            (
                "a",
                &[
                    ("Ready", "False", "RouteConflict"),
                    ("Degraded", "True", "RouteConflict"),
                ],
                &["RouteConflict"],
            ),
        ],
    },
    Scenario {
        name: "a provider this process does not have",
        objects: &[("cloud", "/cloud", "aws")],
        list_fails: None,
        launch_fails: None,
        expect: &[(
            "cloud",
            &[
                ("Ready", "False", "ProviderNotConfigured"),
                ("Degraded", "True", "ProviderNotConfigured"),
            ],
            &[],
        )],
    },
    Scenario {
        name: "listing is throttled",
        objects: &[("web", "/web", "local")],
        list_fails: Some(ErrorClass::Throttled),
        launch_fails: None,
        expect: &[("web", &[("Degraded", "True", "Throttled")], &[])],
    },
    Scenario {
        name: "no capacity to launch",
        objects: &[("web", "/web", "local")],
        list_fails: None,
        launch_fails: Some(ErrorClass::Capacity),
        expect: &[(
            "web",
            &[("Degraded", "True", "InsufficientCapacity")],
            &["InsufficientCapacity"],
        )],
    },
];

/// What a user sees of one object: its conditions (type, status, reason) and its Events'
/// (type, reason).
#[derive(Debug, PartialEq, Default)]
struct Seen {
    conditions: Vec<(String, String, String)>,
    events: Vec<(String, String)>,
    /// `status.autoscaling.desiredReplicas`, where the autoscaler's count is recorded.
    autoscaled: Option<u64>,
}

fn conditions(status: &Value) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or("").to_string();
            (s("type"), s("status"), s("reason"))
        })
        .collect();
    out.sort();
    out
}

fn manifest(name: &str, route: &str, provider: &str, age: usize) -> Value {
    let (provider, autoscaling) = match provider {
        "aws" => (json!({"aws": {"imageId": "ami-0123456789abcdef0"}}), None),
        "local-autoscaled" => (
            json!({"local": {}}),
            Some(json!({"minReplicas": 3, "maxReplicas": 6})),
        ),
        _ => (json!({"local": {}}), None),
    };
    let mut m = json!({
        "apiVersion": "fleetlb.dev/v1alpha1",
        "kind": "BackendCluster",
        "metadata": {
            "name": name, "namespace": "default", "uid": format!("uid-{name}"), "generation": 1,
            "resourceVersion": "1", "finalizers": [FINALIZER],
            "creationTimestamp": format!("2026-11-28T00:00:{:02}Z", age),
        },
        "spec": {"route": route, "replicas": 2, "instanceType": "t2.micro", "provider": provider},
    });
    if let Some(a) = autoscaling {
        m["spec"]["autoscaling"] = a;
    }
    m
}

fn providers(s: &Scenario) -> Providers {
    Providers {
        local: Some(Arc::new(Fake {
            list_fails: s.list_fails,
            launch_fails: s.launch_fails,
            ..Fake::default()
        })),
        ..Providers::default()
    }
}

/// Where a standalone driver publishes, and the receivers that keep the channels open.
#[allow(clippy::type_complexity)]
fn outputs() -> (
    Outputs,
    (
        watch::Receiver<RouteTable>,
        watch::Receiver<bytes::Bytes>,
        watch::Receiver<bool>,
    ),
) {
    let (routes, r1) = watch::channel(RouteTable::default());
    let (status, r2) = watch::channel(bytes::Bytes::new());
    let (ready, r3) = watch::channel(false);
    (
        Outputs {
            routes,
            status,
            ready,
        },
        (r1, r2, r3),
    )
}

/// The scenario through the standalone driver: one file per object, one pass.
async fn standalone(s: &Scenario) -> BTreeMap<String, Seen> {
    let dir = tempfile::tempdir().unwrap();
    for (i, (name, route, provider)) in s.objects.iter().enumerate() {
        let mut m = manifest(name, route, provider, i);
        // A file names no UID, finalizer or creation time: the driver gives them.
        m["metadata"] = json!({"name": name});
        std::fs::write(
            dir.path().join(format!("{i}-{name}.yaml")),
            serde_json::to_string(&m).unwrap(),
        )
        .unwrap();
    }
    let registry = prometheus::Registry::new();
    let dataplane = Dataplane::new(ProxyConfig::default(), &registry).unwrap();
    let metrics = Metrics::new(&registry).unwrap();
    let mut driver = Standalone::new(
        StandaloneConfig::new(dir.path().to_path_buf()),
        providers(s),
        dataplane,
        metrics,
    );
    let (out, _receivers) = outputs();
    driver.step(&out).await;
    let doc: Value = serde_json::from_slice(&out.status.borrow()).unwrap();
    doc["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let events = c["events"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    let s = |k: &str| e[k].as_str().unwrap_or("").to_string();
                    (s("type"), s("reason"))
                })
                .collect();
            let seen = Seen {
                conditions: conditions(&c["status"]),
                events,
                autoscaled: c["status"]["autoscaling"]["desiredReplicas"].as_u64(),
            };
            (c["name"].as_str().unwrap().to_string(), seen)
        })
        .collect()
}

/// The scenario through the Kubernetes driver: every object in the store, one reconcile each,
/// against an API server that accepts every status write and Event.
async fn kubernetes(s: &Scenario) -> BTreeMap<String, Seen> {
    let stored: BTreeMap<String, Value> = s
        .objects
        .iter()
        .enumerate()
        .map(|(i, (name, route, provider))| (name.to_string(), manifest(name, route, provider, i)))
        .collect();
    let (client, recorded, api) = fake::api_server(stored);
    let registry = prometheus::Registry::new();
    let dataplane = Dataplane::new(ProxyConfig::default(), &registry).unwrap();
    let metrics = Metrics::new(&registry).unwrap();
    let cfg = KubeConfig::default();
    let core = Core::new(providers(s), dataplane, metrics, cfg.core.clone());
    let objects: Vec<BackendCluster> = s
        .objects
        .iter()
        .enumerate()
        .map(|(i, (name, route, provider))| {
            serde_json::from_value(manifest(name, route, provider, i)).unwrap()
        })
        .collect();
    let (store, mut writer) = reflector::store();
    for o in &objects {
        writer.apply_watcher_event(&watcher::Event::Apply(o.clone().into()));
    }
    let wiring = Wiring {
        client,
        reporter: Reporter {
            controller: "fleetlb".into(),
            instance: Some("replica-a".into()),
        },
        leader: watch::channel(true).1,
        term: fleetlb_controller::lease::Term::unbounded(),
        routes: watch::channel(RouteTable::default()).0,
        status: watch::channel(bytes::Bytes::new()).0,
    };
    let ctx = Arc::new(Context::new(wiring, core, store, cfg));
    let reconcile = |o: &BackendCluster| {
        tokio::time::timeout(
            Duration::from_secs(30),
            kubernetes::reconcile(Arc::new(o.clone().into()), ctx.clone()),
        )
    };
    for o in &objects {
        reconcile(o).await.expect("a reconcile ends").ok();
    }
    let first: BTreeMap<String, Seen> = {
        let r = std::mem::take(&mut *recorded.lock().unwrap());
        let names: std::collections::BTreeSet<&String> =
            r.statuses.keys().chain(r.events.keys()).collect();
        names
            .into_iter()
            .map(|name| {
                let status = r.statuses.get(name).cloned().unwrap_or(Value::Null);
                let events = r.events.get(name).into_iter().flatten();
                let s = |e: &Value, k: &str| e[k].as_str().unwrap_or("").to_string();
                let seen = Seen {
                    conditions: conditions(&status),
                    events: events.map(|e| (s(e, "type"), s(e, "reason"))).collect(),
                    autoscaled: status["autoscaling"]["desiredReplicas"].as_u64(),
                };
                (name.clone(), seen)
            })
            .collect()
    };
    for o in objects.iter().filter(|o| o.spec.autoscaling.is_some()) {
        // Its instances launched (the fake runs them at once) and nothing is in motion, yet
        // the count may change with the load at any time: looked at again at the busy period,
        // not the 30 s resync.
        let action = reconcile(o).await.expect("a reconcile ends");
        assert_eq!(
            action.ok(),
            Some(kube::runtime::controller::Action::requeue(ctx.cfg.busy))
        );
    }
    drop(ctx);
    api.abort();
    first
}

#[tokio::test]
async fn both_drivers_show_the_same_conditions_and_events() {
    for s in SCENARIOS {
        let files = standalone(s).await;
        let api = kubernetes(s).await;
        assert_eq!(files, api, "{}: standalone vs Kubernetes", s.name);
        for (name, _, _) in s.objects {
            let want = (*name == "auto").then_some(3);
            assert_eq!(files[*name].autoscaled, want, "{}: {name}", s.name);
        }
        for (name, conds, events) in s.expect {
            let got = &files[*name];
            for (t, status, reason) in *conds {
                assert!(
                    got.conditions.iter().any(|(gt, gs, gr)| gt == t
                        && gs == status
                        && (reason.is_empty() || gr == reason)),
                    "{}: {name}: no {t}={status} {reason} in {:?}",
                    s.name,
                    got.conditions
                );
            }
            let reasons: Vec<&str> = got.events.iter().map(|(_, r)| r.as_str()).collect();
            assert_eq!(&reasons, events, "{}: {name}: Events", s.name);
        }
    }
}

/// A provider no object uses is never called by the standalone driver, orphan sweep included
/// (the demo with a controller id needs no AWS credentials, and makes no DescribeInstances).
#[tokio::test]
async fn standalone_never_lists_a_provider_no_object_uses() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manifest("web", "/web", "local", 0);
    m["metadata"] = json!({"name": "web"});
    std::fs::write(dir.path().join("web.yaml"), m.to_string()).unwrap();
    let aws = Arc::new(Fake {
        aws: true,
        ..Fake::default()
    });
    let local = Arc::new(Fake::default());
    let registry = prometheus::Registry::new();
    let mut cfg = StandaloneConfig::new(dir.path().to_path_buf());
    cfg.core.orphan_grace = Duration::ZERO;
    let mut driver = Standalone::new(
        cfg,
        Providers {
            local: Some(local.clone()),
            aws: Some(aws.clone()),
            ..Providers::default()
        },
        Dataplane::new(ProxyConfig::default(), &registry).unwrap(),
        Metrics::new(&registry).unwrap(),
    );
    let (out, _receivers) = outputs();
    for _ in 0..3 {
        driver.step(&out).await;
    }
    assert!(
        local.lists.load(Ordering::Relaxed) >= 3,
        "local is listed every pass"
    );
    assert_eq!(aws.lists.load(Ordering::Relaxed), 0, "aws was listed");
}
