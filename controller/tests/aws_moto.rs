//! The aws provider and the reconcile loop against a real `moto_server` on 127.0.0.1, reached
//! through aws-sdk-ec2 with the endpoint overridden. No traffic goes to the instances' (fake,
//! private) addresses: the data plane's route table is published but no prober runs here.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetlb_controller::Providers;
use fleetlb_controller::metrics::Metrics;
use fleetlb_controller::provider::aws::{AwsProvider, tags};
use fleetlb_controller::provider::{ClusterKey, LaunchRequest, Provider};
use fleetlb_controller::standalone::{Outputs, Standalone, StandaloneConfig};
use fleetlb_dataplane::{Dataplane, ProxyConfig, RouteTable};
use tokio::sync::watch;

mod support;
use support::{Env, Fault, FaultProxy, env, sdk_config};

/// `yaml` with `spec.capacityType: capacity`.
fn spot_yaml(yaml: &str, capacity: &str) -> String {
    yaml.replace(
        "  port: 8000\n",
        &format!("  port: 8000\n  capacityType: {capacity}\n"),
    )
}

fn yaml(env: &Env, name: &str, replicas: u32, policy: &str) -> String {
    format!(
        "apiVersion: fleetlb.dev/v1alpha1\nkind: BackendCluster\nmetadata:\n  name: {name}\nspec:\n  route: /{name}\n  replicas: {replicas}\n  instanceType: t2.micro\n  port: 8000\n  deletionPolicy: {policy}\n  provider:\n    aws:\n      imageId: {}\n      subnetIds: [{}]\n      tags: {{team: web}}\n",
        env.image,
        env.subnets.join(", ")
    )
}

struct Driver {
    driver: Standalone,
    out: Outputs,
    dataplane: Dataplane,
    _rx: watch::Receiver<RouteTable>,
    _status: watch::Receiver<Bytes>,
}

fn driver(env: &Env, dir: &Path, controller_id: &str) -> Driver {
    driver_with(&env.conf, dir, controller_id, |_| {})
}

fn driver_with(
    conf: &aws_config::SdkConfig,
    dir: &Path,
    controller_id: &str,
    tune: impl FnOnce(&mut StandaloneConfig),
) -> Driver {
    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(&registry).unwrap();
    // Short call timeouts, so a hung EC2 endpoint costs the tests little time.
    let timeouts = fleetlb_controller::provider::aws::Timeouts {
        connect: Duration::from_secs(2),
        attempt: Duration::from_millis(500),
        operation: Duration::from_secs(3),
    };
    let aws = AwsProvider::with_timeouts(conf, controller_id.into(), metrics.clone(), timeouts);
    let providers = Providers {
        aws: Some(Arc::new(aws)),
        endpoints: Some(Arc::new(
            fleetlb_controller::provider::endpoints::EndpointsProvider,
        )),
        ..Default::default()
    };
    // The data plane is only a health source here; nothing probes the fake addresses.
    let dataplane = Dataplane::new(ProxyConfig::default(), &registry).unwrap();
    let mut cfg = StandaloneConfig::new(dir.to_path_buf());
    cfg.core.drain = Duration::ZERO;
    cfg.core.orphan_grace = Duration::ZERO;
    tune(&mut cfg);
    let (routes, rx) = watch::channel(RouteTable::default());
    let (status, status_rx) = watch::channel(Bytes::new());
    let (ready, _) = watch::channel(false);
    Driver {
        driver: Standalone::new(cfg, providers, dataplane.clone(), metrics),
        dataplane,
        out: Outputs {
            routes,
            status,
            ready,
        },
        _rx: rx,
        _status: status_rx,
    }
}

/// Live instances of `controller` for cluster `name`.
async fn live(
    ec2: &aws_sdk_ec2::Client,
    controller: &str,
    name: &str,
) -> Vec<aws_sdk_ec2::types::Instance> {
    support::live(ec2, controller, Some(name)).await
}

/// Steps the driver until `n` live instances of `name` exist (at most 20 passes).
async fn converge(d: &mut Driver, env: &Env, ctl: &str, name: &str, n: usize) {
    for _ in 0..20 {
        d.driver.step(&d.out).await;
        if live(&env.ec2, ctl, name).await.len() == n {
            // One more pass must not change anything.
            d.driver.step(&d.out).await;
            assert_eq!(
                live(&env.ec2, ctl, name).await.len(),
                n,
                "{name} did not stay at {n}"
            );
            return;
        }
    }
    panic!(
        "{name} never converged to {n} instances (now {})",
        live(&env.ec2, ctl, name).await.len()
    );
}

fn tag<'a>(i: &'a aws_sdk_ec2::types::Instance, k: &str) -> Option<&'a str> {
    i.tags()
        .iter()
        .find(|t| t.key() == Some(k))
        .and_then(|t| t.value())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launches_tagged_instances_scales_replaces_and_deletes() {
    let env = env().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.yaml"), yaml(&env, "web", 4, "Delete")).unwrap();
    let mut d = driver(&env, dir.path(), "ctl-a");
    converge(&mut d, &env, "ctl-a", "web", 4).await;

    let is = live(&env.ec2, "ctl-a", "web").await;
    let mut slots: Vec<&str> = is.iter().map(|i| tag(i, tags::SLOT).unwrap()).collect();
    slots.sort();
    assert_eq!(slots, ["0", "1", "2", "3"]);
    for i in &is {
        assert_eq!(tag(i, tags::NAMESPACE), Some("default"));
        assert_eq!(tag(i, "team"), Some("web"), "user tags applied at creation");
        assert!(tag(i, tags::UID).is_some() && tag(i, tags::SPEC_HASH).is_some());
        assert_eq!(i.image_id(), Some(env.image.as_str()));
        assert!(
            env.subnets
                .iter()
                .any(|s| Some(s.as_str()) == i.subnet_id())
        );
    }
    let subnets_used: std::collections::HashSet<_> =
        is.iter().filter_map(|i| i.subnet_id()).collect();
    assert_eq!(
        subnets_used.len(),
        env.subnets.len().min(4),
        "instances spread over the subnets"
    );
    let attr = env
        .ec2
        .describe_instance_attribute()
        .instance_id(is[0].instance_id().unwrap())
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    let ud = attr
        .user_data()
        .and_then(|u| u.value())
        .expect("user data set");
    let ud = String::from_utf8(aws_smithy_types::base64::decode(ud).unwrap()).unwrap();
    assert!(
        ud.contains("fleetlb default bootstrap") && ud.contains("X-aws-ec2-metadata-token"),
        "{ud}"
    );

    // Scale 4 -> 6 -> 2.
    std::fs::write(dir.path().join("web.yaml"), yaml(&env, "web", 6, "Delete")).unwrap();
    converge(&mut d, &env, "ctl-a", "web", 6).await;
    std::fs::write(dir.path().join("web.yaml"), yaml(&env, "web", 2, "Delete")).unwrap();
    converge(&mut d, &env, "ctl-a", "web", 2).await;

    // An instance terminated behind fleetlb's back is replaced.
    let victim = live(&env.ec2, "ctl-a", "web").await[0]
        .instance_id()
        .unwrap()
        .to_string();
    env.ec2
        .terminate_instances()
        .instance_ids(&victim)
        .send()
        .await
        .unwrap();
    converge(&mut d, &env, "ctl-a", "web", 2).await;
    assert!(
        live(&env.ec2, "ctl-a", "web")
            .await
            .iter()
            .all(|i| i.instance_id() != Some(victim.as_str()))
    );

    // Deleting the object (Delete policy) terminates everything it owned.
    std::fs::remove_file(dir.path().join("web.yaml")).unwrap();
    converge(&mut d, &env, "ctl-a", "web", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_policy_leaves_instances_running_and_unowned() {
    let env = env().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keep.yaml"),
        yaml(&env, "keep", 2, "Orphan"),
    )
    .unwrap();
    let mut d = driver(&env, dir.path(), "ctl-b");
    converge(&mut d, &env, "ctl-b", "keep", 2).await;
    let ids: Vec<String> = live(&env.ec2, "ctl-b", "keep")
        .await
        .iter()
        .map(|i| i.instance_id().unwrap().to_string())
        .collect();
    std::fs::remove_file(dir.path().join("keep.yaml")).unwrap();
    for _ in 0..5 {
        d.driver.step(&d.out).await;
    }
    assert_eq!(
        live(&env.ec2, "ctl-b", "keep").await.len(),
        0,
        "still owned by fleetlb"
    );
    let out = env
        .ec2
        .describe_instances()
        .set_instance_ids(Some(ids.clone()))
        .send()
        .await
        .unwrap();
    let states: Vec<_> = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(|i| {
            i.state()
                .and_then(|s| s.name())
                .unwrap()
                .as_str()
                .to_string()
        })
        .collect();
    assert_eq!(
        states,
        vec!["running"; 2],
        "orphaned instances must keep running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_never_duplicates_and_sweeps_orphans() {
    let env = env().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api.yaml"), yaml(&env, "api", 3, "Delete")).unwrap();

    // "Crash" after every single pass: each pass runs in a fresh controller process state.
    for _ in 0..6 {
        let mut d = driver(&env, dir.path(), "ctl-c");
        d.driver.step(&d.out).await;
        assert!(
            live(&env.ec2, "ctl-c", "api").await.len() <= 3,
            "a restart duplicated instances"
        );
    }
    assert_eq!(live(&env.ec2, "ctl-c", "api").await.len(), 3);

    // Every launch carries the ClientToken derived from its intent (UID, slot, spec hash,
    // attempt), which EC2 uses to answer a repeated launch with the instance it already made.
    // (moto records the token but does not deduplicate, so the repeat itself is EC2's part.)
    let registry = prometheus::Registry::new();
    let p = AwsProvider::new(&env.conf, "ctl-c".into(), Metrics::new(&registry).unwrap());
    let bc: fleetlb_crds::BackendCluster =
        serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&yaml(&env, "solo", 1, "Delete"))
            .ok()
            .and_then(|v| serde_json::from_value(serde_json::to_value(v).unwrap()).ok())
            .unwrap();
    let req = LaunchRequest {
        grpc: false,
        capacity_type: Default::default(),
        instance_types: Vec::new(),
        owner: ClusterKey {
            namespace: "default".into(),
            name: "solo".into(),
        },
        owner_uid: "uid-solo".into(),
        slot: 0,
        instance_type: "t2.micro".into(),
        port: 8000,
        provider: bc.spec.provider.clone(),
        spec_hash: "h".into(),
        attempt: 0,
        token_scope: String::new(),
        replay: false,
    };
    let fleetlb_controller::provider::Launch::Made(first) = p.launch(&req).await.unwrap() else {
        panic!("not launched")
    };
    let described = env
        .ec2
        .describe_instances()
        .instance_ids(&first.id)
        .send()
        .await
        .unwrap();
    let token = described.reservations()[0].instances()[0]
        .client_token()
        .map(str::to_string);
    assert_eq!(
        token,
        Some(fleetlb_controller::provider::aws::client_token(
            "uid-solo", 0, "h", 0
        ))
    );

    // "solo" has no object: after the grace period (zero here) the next pass terminates it.
    let mut d = driver(&env, dir.path(), "ctl-c");
    d.driver.step(&d.out).await;
    d.driver.step(&d.out).await;
    assert_eq!(
        live(&env.ec2, "ctl-c", "solo").await.len(),
        0,
        "orphan not swept"
    );
    assert_eq!(
        live(&env.ec2, "ctl-c", "api").await.len(),
        3,
        "the sweep touched owned instances"
    );

    // Another controller's instances are never touched.
    let empty = tempfile::tempdir().unwrap();
    let mut other = driver(&env, empty.path(), "ctl-other");
    other.driver.step(&other.out).await;
    assert_eq!(live(&env.ec2, "ctl-c", "api").await.len(), 3);
}

/// The cluster's Degraded condition (reason, message) in the driver's `/status`.
fn degraded(d: &Driver) -> (String, String) {
    let v: serde_json::Value = serde_json::from_slice(&d.out.status.borrow()).unwrap();
    let c = v["clusters"][0]["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap()
        .clone();
    (
        c["reason"].as_str().unwrap().to_string(),
        c["message"].as_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_server_errors_and_hangs_back_off_report_and_converge_when_they_stop() {
    let env = env().await;
    let faults = FaultProxy::start(&env._moto.url).await;
    let conf = sdk_config(&faults.url);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.yaml"), yaml(&env, "web", 2, "Delete")).unwrap();
    // A long first backoff makes "no retry before it ends" a count, not a timing.
    let mut d = driver_with(&conf, dir.path(), "ctl-t", |c| {
        c.core.backoff = (Duration::from_secs(3600), Duration::from_secs(3600));
    });

    faults.set("RunInstances", Some(Fault::Throttle));
    for _ in 0..5 {
        d.driver.step(&d.out).await;
    }
    let (reason, msg) = degraded(&d);
    assert_eq!(reason, "Throttled", "{msg}");
    assert!(msg.contains("RequestLimitExceeded"), "{msg}");
    let tried = faults.count("RunInstances");
    // The SDK retried the throttled call itself (at most 3 attempts), then the driver backed off:
    // four more passes made no call at all.
    assert!((1..=3).contains(&tried), "{tried} RunInstances calls");
    assert!(faults.count("DescribeInstances") >= 5, "listing goes on");
    assert!(live(&env.ec2, "ctl-t", "web").await.is_empty());

    // 500s are reported as the provider being unavailable; an edit retries at once.
    faults.set("RunInstances", Some(Fault::ServerError));
    std::fs::write(dir.path().join("web.yaml"), yaml(&env, "web", 3, "Delete")).unwrap();
    d.driver.step(&d.out).await;
    let (reason, msg) = degraded(&d);
    assert_eq!(reason, "ProviderUnavailable", "{msg}");
    assert!(faults.count("RunInstances") > tried);

    // EC2 stops answering: the call times out (it does not stall the controller) and the
    // status says the provider is unavailable.
    faults.set("RunInstances", Some(Fault::Hang));
    std::fs::write(dir.path().join("web.yaml"), yaml(&env, "web", 4, "Delete")).unwrap();
    tokio::time::timeout(Duration::from_secs(30), d.driver.step(&d.out))
        .await
        .expect("a hung EC2 call ends at its timeout");
    let (reason, msg) = degraded(&d);
    assert_eq!(reason, "ProviderUnavailable", "{msg}");
    assert!(msg.contains("timeout"), "{msg}");

    // Faults stop: the next edit converges, with no duplicate.
    faults.set("RunInstances", None);
    std::fs::write(dir.path().join("web.yaml"), yaml(&env, "web", 2, "Delete")).unwrap();
    converge(&mut d, &env, "ctl-t", "web", 2).await;
    // (Nothing probes the fake addresses here, so the instances are not healthy, but the
    // provider trouble is over.)
    let (reason, msg) = degraded(&d);
    assert!(
        reason != "Throttled" && reason != "ProviderUnavailable",
        "{reason}: {msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_at_random_points_never_exceeds_replicas() {
    let env = env().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.yaml"), yaml(&env, "web", 3, "Delete")).unwrap();
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let mut kills = 0;
    for round in 0..30 {
        if round == 15 {
            std::fs::write(dir.path().join("web.yaml"), yaml(&env, "web", 2, "Delete")).unwrap();
        }
        // A fresh process each round (no memory but EC2's), killed after a random time: while
        // listing, between RunInstances being sent and answered, mid-termination, or not at all.
        let mut d = driver(&env, dir.path(), "ctl-r");
        let budget = Duration::from_millis(rng.u64(0..60));
        if tokio::time::timeout(budget, d.driver.step(&d.out))
            .await
            .is_err()
        {
            kills += 1;
        }
        let n = live(&env.ec2, "ctl-r", "web").await.len();
        assert!(n <= 3, "round {round}: {n} live instances for 3 replicas");
    }
    assert!(kills >= 5, "only {kills} rounds were cut short");
    let mut d = driver(&env, dir.path(), "ctl-r");
    converge(&mut d, &env, "ctl-r", "web", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_data_never_appears_in_status() {
    let env = env().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = "SECRET-7f3a9c";
    let text = yaml(&env, "web", 1, "Delete").replace(
        "      tags: {team: web}\n",
        &format!("      tags: {{team: web}}\n      userData: \"#!/bin/bash\\nexport TOKEN={secret}\\n\"\n"),
    );
    assert!(text.contains(secret));
    std::fs::write(dir.path().join("web.yaml"), text).unwrap();
    let mut d = driver(&env, dir.path(), "ctl-s");
    converge(&mut d, &env, "ctl-s", "web", 1).await;
    // It reached the instance...
    let id = live(&env.ec2, "ctl-s", "web").await[0]
        .instance_id()
        .unwrap()
        .to_string();
    let attr = env
        .ec2
        .describe_instance_attribute()
        .instance_id(&id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    let ud = attr.user_data().and_then(|u| u.value()).unwrap();
    let ud = String::from_utf8(aws_smithy_types::base64::decode(ud).unwrap()).unwrap();
    assert!(ud.contains(secret));
    // ...and nowhere in what fleetlb shows.
    let status = String::from_utf8(d.out.status.borrow().to_vec()).unwrap();
    assert!(status.contains(&id), "{status}");
    assert!(!status.contains(secret), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_security_groups_change_outside_fleetlb_is_replaced() {
    let env = env().await;
    let vpc = env.ec2.describe_vpcs().send().await.unwrap().vpcs()[0]
        .vpc_id()
        .unwrap()
        .to_string();
    let sg = |name: &'static str| {
        let ec2 = env.ec2.clone();
        let vpc = vpc.clone();
        async move {
            ec2.create_security_group()
                .group_name(name)
                .description(name)
                .vpc_id(vpc)
                .send()
                .await
                .unwrap()
                .group_id()
                .unwrap()
                .to_string()
        }
    };
    let (web, open) = (sg("web").await, sg("wide-open").await);
    let dir = tempfile::tempdir().unwrap();
    let text = yaml(&env, "web", 1, "Delete").replace(
        "      tags: {team: web}\n",
        &format!("      tags: {{team: web}}\n      securityGroupIds: [{web}]\n"),
    );
    std::fs::write(dir.path().join("web.yaml"), text).unwrap();
    let mut d = driver(&env, dir.path(), "ctl-d");
    converge(&mut d, &env, "ctl-d", "web", 1).await;
    let first = live(&env.ec2, "ctl-d", "web").await[0]
        .instance_id()
        .unwrap()
        .to_string();

    // Someone opens the instance up in the console.
    env.ec2
        .modify_instance_attribute()
        .instance_id(&first)
        .groups(&open)
        .send()
        .await
        .unwrap();
    // Replaced surge-first: a new instance with the spec's group; the drifted one goes once
    // the new one is ready (nothing probes here, so readiness never comes: it keeps serving).
    let mut replaced = false;
    for _ in 0..20 {
        d.driver.step(&d.out).await;
        let now = live(&env.ec2, "ctl-d", "web").await;
        if now.len() == 2 {
            let new = now
                .iter()
                .find(|i| i.instance_id() != Some(first.as_str()))
                .unwrap();
            let groups: Vec<&str> = new
                .security_groups()
                .iter()
                .filter_map(|g| g.group_id())
                .collect();
            assert_eq!(groups, [web.as_str()]);
            replaced = true;
            break;
        }
    }
    assert!(replaced, "no replacement for the drifted instance");
    let v: serde_json::Value = serde_json::from_slice(&d.out.status.borrow()).unwrap();
    let progressing = v["clusters"][0]["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Progressing")
        .unwrap()
        .clone();
    assert!(
        progressing["message"].as_str().unwrap().contains(&open),
        "{progressing}"
    );
}

/// The `/status` document of a driver.
fn status(d: &Driver) -> serde_json::Value {
    serde_json::from_slice(&d.out.status.borrow()).unwrap()
}

/// The notes of the first cluster's Events with `reason`, as `/status` lists them.
fn notes(d: &Driver, reason: &str) -> Vec<String> {
    status(d)["clusters"][0]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["reason"] == reason)
        .filter_map(|e| e["note"].as_str().map(String::from))
        .collect()
}

/// States of every instance of `name` carrying `controller` (terminated ones too).
async fn states(env: &Env, controller: &str, name: &str) -> Vec<(String, String)> {
    use aws_sdk_ec2::types::Filter;
    let out = env
        .ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name(format!("tag:{}", tags::CONTROLLER))
                .values(controller)
                .build(),
        )
        .filters(
            Filter::builder()
                .name(format!("tag:{}", tags::NAME))
                .values(name)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let mut v: Vec<(String, String)> = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(|i| {
            (
                i.instance_id().unwrap().to_string(),
                i.state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_string())
                    .unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_launch_carries_the_same_token_and_subnet() {
    let env = env().await;
    assert_eq!(
        env.subnets.len(),
        3,
        "moto's default VPC has three subnets or more"
    );
    let proxy = FaultProxy::start(&env._moto.url).await;
    let conf = sdk_config(&proxy.url);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.yaml"), yaml(&env, "web", 2, "Delete")).unwrap();
    // EC2 does not list the new instances yet: every pass replays the launches, and so does
    // a restarted controller.
    proxy.hide_new(true);
    let mut d = driver_with(&conf, dir.path(), "ctl-s", |_| {});
    for _ in 0..3 {
        d.driver.step(&d.out).await;
    }
    for _ in 0..2 {
        let mut crashed = driver_with(&conf, dir.path(), "ctl-s", |_| {});
        crashed.driver.step(&crashed.out).await;
    }
    d.driver.step(&d.out).await;
    let mut by_token: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for body in proxy.requests() {
        let f = support::form(&body);
        let get = |k: &str| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        if get("Action").as_deref() == Some("RunInstances") {
            by_token
                .entry(get("ClientToken").unwrap())
                .or_default()
                .insert(get("SubnetId").unwrap_or_default());
        }
    }
    assert_eq!(by_token.len(), 2, "one token per slot: {by_token:?}");
    assert!(
        proxy.count("RunInstances") >= 6,
        "the launches were replayed ({} calls)",
        proxy.count("RunInstances")
    );
    for (token, subnets) in &by_token {
        assert_eq!(
            subnets.len(),
            1,
            "{token} was sent with subnets {subnets:?}"
        );
    }
    assert_eq!(
        proxy.mismatches(),
        0,
        "EC2 answered IdempotentParameterMismatch"
    );
    proxy.hide_new(false);
    converge(&mut d, &env, "ctl-s", "web", 2).await;
    let subnets: std::collections::BTreeSet<_> = live(&env.ec2, "ctl-s", "web")
        .await
        .iter()
        .filter_map(|i| i.subnet_id().map(String::from))
        .collect();
    assert_eq!(subnets.len(), 2, "the two slots sit in two subnets");

    // A token EC2 already saw with other parameters (here: the subnet list reordered, so the
    // same intent maps to another subnet) is "already launched", not a failure.
    let registry = prometheus::Registry::new();
    let p = AwsProvider::new(&conf, "ctl-s".into(), Metrics::new(&registry).unwrap());
    use fleetlb_controller::provider::Launch;
    let mut req = solo_request(&env, &env.subnets);
    let Launch::Made(first) = p.launch(&req).await.unwrap() else {
        panic!("not launched")
    };
    let mut reordered = env.subnets.clone();
    reordered.rotate_left(1);
    req = solo_request(&env, &reordered);
    match p.launch(&req).await.unwrap() {
        Launch::Made(i) => assert_eq!(i.id, first.id, "the token's own instance"),
        other => panic!("IdempotentParameterMismatch means the launch exists: {other:?}"),
    }
    assert_eq!(proxy.mismatches(), 1);
    // While DescribeInstances does not show it yet, the launch is pending, not failed.
    proxy.hide_new(true);
    let mut fresh = solo_request(&env, &env.subnets);
    fresh.slot = 1;
    let Launch::Made(hidden) = p.launch(&fresh).await.unwrap() else {
        panic!("not launched")
    };
    fresh.provider = solo_request(&env, &reordered).provider;
    assert!(
        matches!(p.launch(&fresh).await.unwrap(), Launch::Pending),
        "{} is not listed yet",
        hidden.id
    );
    proxy.hide_new(false);
    // The same token held by another install (two installs given one --controller-id would
    // do this): a clear error, not an endless wait.
    let other = AwsProvider::new(
        &conf,
        "ctl-other".into(),
        Metrics::new(&prometheus::Registry::new()).unwrap(),
    );
    let mut theirs = solo_request(&env, &reordered);
    theirs.token_scope = "ctl-s".into();
    let err = other.launch(&theirs).await.unwrap_err().to_string();
    assert!(
        err.contains("IdempotentParameterMismatch") && err.contains("ctl-s"),
        "{err}"
    );
}

fn solo_request(env: &Env, subnets: &[String]) -> LaunchRequest {
    LaunchRequest {
        grpc: false,
        capacity_type: Default::default(),
        instance_types: Vec::new(),
        owner: ClusterKey {
            namespace: "default".into(),
            name: "solo".into(),
        },
        owner_uid: "uid-solo".into(),
        slot: 0,
        instance_type: "t2.micro".into(),
        port: 8000,
        provider: fleetlb_crds::ProviderSpec::Aws(fleetlb_crds::AwsProvider {
            image_id: env.image.clone(),
            subnet_ids: subnets.to_vec(),
            ..Default::default()
        }),
        spec_hash: "h".into(),
        attempt: 0,
        token_scope: "ctl-s".into(),
        replay: false,
    }
}

/// Stops one live instance of `name` behind fleetlb's back (a console Stop); returns its id.
async fn stop_one(env: &Env, controller: &str, name: &str) -> String {
    let victim = live(&env.ec2, controller, name).await[0]
        .instance_id()
        .unwrap()
        .to_string();
    env.ec2
        .stop_instances()
        .instance_ids(&victim)
        .send()
        .await
        .unwrap();
    victim
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_instances_are_replaced_then_terminated_and_never_block_deletion() {
    let env = env().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.yaml"), yaml(&env, "web", 2, "Delete")).unwrap();
    let mut d = driver(&env, dir.path(), "ctl-stop");
    converge(&mut d, &env, "ctl-stop", "web", 2).await;
    let victim = stop_one(&env, "ctl-stop", "web").await;
    let mut replaced = false;
    for _ in 0..20 {
        d.driver.step(&d.out).await;
        let st = states(&env, "ctl-stop", "web").await;
        let victim_state = st
            .iter()
            .find(|(id, _)| *id == victim)
            .map(|(_, s)| s.clone());
        let running = st.iter().filter(|(_, s)| s == "running").count();
        if running == 2 && victim_state.as_deref() == Some("terminated") {
            replaced = true;
            break;
        }
    }
    assert!(
        replaced,
        "stopped instance not replaced and terminated: {:?}",
        states(&env, "ctl-stop", "web").await
    );

    // Stop one more, then delete the cluster: deletion terminates the stopped one too and
    // completes.
    stop_one(&env, "ctl-stop", "web").await;
    std::fs::remove_file(dir.path().join("web.yaml")).unwrap();
    let mut gone = false;
    for _ in 0..20 {
        d.driver.step(&d.out).await;
        if status(&d)["clusters"].as_array().unwrap().is_empty() {
            gone = true;
            break;
        }
    }
    assert!(gone, "deletion never completed: {}", status(&d));
    let left: Vec<_> = states(&env, "ctl-stop", "web")
        .await
        .into_iter()
        .filter(|(_, s)| s != "terminated" && s != "shutting-down")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_installs_in_one_account_never_touch_each_others_instances() {
    let env = env().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The same namespace/name (and so, in standalone, the same derived UID) in both, through
    // the proxy that holds EC2's ClientToken rule: one account's tokens are shared by both
    // installs, so their launches must not send the same token with other tags.
    let proxy = FaultProxy::start(&env._moto.url).await;
    let conf = sdk_config(&proxy.url);
    std::fs::write(
        dir_a.path().join("web.yaml"),
        yaml(&env, "web", 2, "Delete"),
    )
    .unwrap();
    std::fs::write(
        dir_b.path().join("web.yaml"),
        yaml(&env, "web", 2, "Delete"),
    )
    .unwrap();
    let mut a = driver_with(&conf, dir_a.path(), "ctl-one", |_| {});
    let mut b = driver_with(&conf, dir_b.path(), "ctl-two", |_| {});
    converge(&mut b, &env, "ctl-two", "web", 2).await;
    let theirs = |v: Vec<aws_sdk_ec2::types::Instance>| {
        let mut v: Vec<(String, Vec<(String, String)>)> = v
            .iter()
            .map(|i| {
                let mut t: Vec<(String, String)> = i
                    .tags()
                    .iter()
                    .map(|t| (t.key().unwrap().into(), t.value().unwrap().into()))
                    .collect();
                t.sort();
                (i.instance_id().unwrap().to_string(), t)
            })
            .collect();
        v.sort();
        v
    };
    let before = theirs(live(&env.ec2, "ctl-two", "web").await);
    let check = async |what: &str| {
        assert_eq!(
            theirs(live(&env.ec2, "ctl-two", "web").await),
            before,
            "{what}: the other install's instances changed"
        );
    };
    // Create, scale up, scale down, delete, sweep: each step by install one, install two idle.
    converge(&mut a, &env, "ctl-one", "web", 2).await;
    check("create").await;
    std::fs::write(
        dir_a.path().join("web.yaml"),
        yaml(&env, "web", 3, "Delete"),
    )
    .unwrap();
    converge(&mut a, &env, "ctl-one", "web", 3).await;
    check("scale up").await;
    std::fs::write(
        dir_a.path().join("web.yaml"),
        yaml(&env, "web", 1, "Delete"),
    )
    .unwrap();
    converge(&mut a, &env, "ctl-one", "web", 1).await;
    check("scale down").await;
    std::fs::remove_file(dir_a.path().join("web.yaml")).unwrap();
    converge(&mut a, &env, "ctl-one", "web", 0).await;
    check("delete").await;
    // Install one, with no object at all, sweeps orphans (grace zero) over several passes.
    for _ in 0..3 {
        a.driver.step(&a.out).await;
    }
    check("sweep").await;
    // And the other way round: install two scales and deletes; install one's nothing is
    // untouched, and install two's own convergence is unaffected by install one's history.
    std::fs::write(
        dir_b.path().join("web.yaml"),
        yaml(&env, "web", 1, "Delete"),
    )
    .unwrap();
    converge(&mut b, &env, "ctl-two", "web", 1).await;
    assert_eq!(
        proxy.mismatches(),
        0,
        "the installs sent one ClientToken with other parameters"
    );
}

/// The Ready condition of the first cluster in a driver's `/status`.
fn ready(d: &Driver) -> serde_json::Value {
    status(d)["clusters"][0]["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone()
}

/// Steps `d` until its `/status` lists no cluster (at most 10 passes).
async fn until_deleted(d: &mut Driver, what: &str) {
    for _ in 0..10 {
        d.driver.step(&d.out).await;
        if status(d)["clusters"].as_array().unwrap().is_empty() {
            return;
        }
    }
    panic!("{what}: deletion never completed: {}", status(d));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_waits_for_launches_ec2_does_not_list_yet() {
    let env = env().await;
    let proxy = FaultProxy::start(&env._moto.url).await;
    let conf = sdk_config(&proxy.url);
    for policy in ["Delete", "Orphan"] {
        let ctl = format!("ctl-vis-{}", policy.to_lowercase());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("web.yaml"), yaml(&env, "web", 1, policy)).unwrap();
        let mut d = driver_with(&conf, dir.path(), &ctl, |c| {
            c.core.launch_visibility = Duration::from_secs(600);
        });
        // The launch takes effect, but its answer is lost (the controller never learns the
        // instance id) and DescribeInstances does not show the instance yet.
        proxy.hide_new(true);
        proxy.set("RunInstances", Some(Fault::LoseAnswer));
        d.driver.step(&d.out).await;
        proxy.set("RunInstances", None);
        assert_eq!(live(&env.ec2, &ctl, "web").await.len(), 1, "launched");
        std::fs::remove_file(dir.path().join("web.yaml")).unwrap();
        for _ in 0..3 {
            d.driver.step(&d.out).await;
        }
        let v = status(&d);
        assert_eq!(
            v["clusters"][0]["deleting"], true,
            "{policy}: released too early: {v}"
        );
        let r = ready(&d);
        assert_eq!(r["reason"], "Deleting", "{r}");
        assert!(
            r["message"]
                .as_str()
                .unwrap()
                .contains("waiting for the provider to list 1 recent launch"),
            "{r}"
        );
        // EC2 catches up: deletion finds the launch by its token and completes.
        proxy.hide_new(false);
        until_deleted(&mut d, policy).await;
        match policy {
            "Delete" => assert!(
                live(&env.ec2, &ctl, "web").await.is_empty(),
                "Delete left instances running"
            ),
            _ => {
                // Released: still running, no longer carrying this install's tag, and a later
                // sweep (grace zero) does not touch them.
                assert!(live(&env.ec2, &ctl, "web").await.is_empty(), "still owned");
                let running = running_named(&env, "web").await;
                assert!(running >= 1, "orphaned instances must keep running");
                for _ in 0..2 {
                    d.driver.step(&d.out).await;
                }
                assert_eq!(
                    running_named(&env, "web").await,
                    running,
                    "the sweep killed them"
                );
            }
        }
    }

    // Launches that answered with their ids are acted on by id at once, listed or not.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api.yaml"), yaml(&env, "api", 2, "Delete")).unwrap();
    let mut d = driver_with(&conf, dir.path(), "ctl-ids", |c| {
        c.core.launch_visibility = Duration::from_secs(600);
    });
    proxy.hide_new(true);
    d.driver.step(&d.out).await;
    assert_eq!(live(&env.ec2, "ctl-ids", "api").await.len(), 2, "launched");
    std::fs::remove_file(dir.path().join("api.yaml")).unwrap();
    until_deleted(&mut d, "known ids").await;
    assert!(
        live(&env.ec2, "ctl-ids", "api").await.is_empty(),
        "instances of the deleted cluster still run"
    );
    proxy.hide_new(false);
}

/// Running instances tagged `fleetlb.dev/name = name`, whoever owns them.
async fn running_named(env: &Env, name: &str) -> usize {
    use aws_sdk_ec2::types::Filter;
    env.ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name(format!("tag:{}", tags::NAME))
                .values(name)
                .build(),
        )
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .values("running")
                .build(),
        )
        .send()
        .await
        .unwrap()
        .reservations()
        .iter()
        .map(|r| r.instances().len())
        .sum()
}

/// Whether `policy` allows `action` on a resource of `resource_type` (`instance`, `subnet`,
/// ...) in the request context `ctx`, by IAM's rules for the operators the policy uses: an
/// Allow statement whose Action names the action, whose Resource covers the type, and whose
/// every condition holds (`StringEquals`: the key is present with one of the values;
/// `ForAllValues:StringEquals`: every value of the key is among them).
fn allows(
    policy: &serde_json::Value,
    action: &str,
    resource_type: &str,
    ctx: &std::collections::HashMap<String, Vec<String>>,
) -> bool {
    use serde_json::Value;
    let list = |v: &Value| -> Vec<String> {
        match v {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
            _ => Vec::new(),
        }
    };
    policy["Statement"].as_array().unwrap().iter().any(|s| {
        if s["Effect"] != "Allow" || !list(&s["Action"]).iter().any(|a| a == action) {
            return false;
        }
        let covers = list(&s["Resource"]).iter().any(|r| {
            r == "*"
                || r.rsplit(':')
                    .next()
                    .and_then(|t| t.strip_suffix("/*"))
                    .is_some_and(|t| t == resource_type)
        });
        if !covers {
            return false;
        }
        let Some(conds) = s["Condition"].as_object() else {
            return true;
        };
        conds.iter().all(|(op, keys)| {
            keys.as_object().unwrap().iter().all(|(key, want)| {
                let want = list(want);
                let have = ctx.get(key).cloned().unwrap_or_default();
                match op.as_str() {
                    "StringEquals" => have.len() == 1 && want.contains(&have[0]),
                    "ForAllValues:StringEquals" => have.iter().all(|h| want.contains(h)),
                    other => panic!("operator {other} is not modelled by this test"),
                }
            })
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_the_controller_sends_is_allowed_by_the_generated_iam_policy_and_no_more() {
    use std::collections::HashMap;
    let env = env().await;
    let proxy = FaultProxy::start(&env._moto.url).await;
    let conf = sdk_config(&proxy.url);
    let id = "ctl-iam";
    let policy = fleetlb_controller::iam::policy(&fleetlb_controller::iam::PolicyOptions {
        controller_id: id.into(),
        partition: "aws".into(),
        instance_role: "fleetlb-instance".into(),
        interruption_queue: None,
    });
    // Launch (spot first: the spot request is created and tagged too), scale down
    // (terminate), delete with Orphan (release).
    let spot = |n| spot_yaml(&yaml(&env, "web", n, "Orphan"), "spot-then-on-demand");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.yaml"), spot(2)).unwrap();
    let mut d = driver_with(&conf, dir.path(), id, |_| {});
    converge(&mut d, &env, id, "web", 2).await;
    std::fs::write(dir.path().join("web.yaml"), spot(1)).unwrap();
    converge(&mut d, &env, id, "web", 1).await;
    // Each instance's controller tag before the release removes it.
    let owner: HashMap<String, String> = env
        .ec2
        .describe_instances()
        .send()
        .await
        .unwrap()
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(|i| {
            (
                i.instance_id().unwrap().to_string(),
                tag(i, tags::CONTROLLER).unwrap_or("").to_string(),
            )
        })
        .collect();
    std::fs::remove_file(dir.path().join("web.yaml")).unwrap();
    converge(&mut d, &env, id, "web", 0).await;

    let requests: Vec<Vec<(String, String)>> =
        proxy.requests().iter().map(|b| support::form(b)).collect();
    let mut seen: std::collections::BTreeSet<String> = Default::default();
    let ctx = |pairs: &[(&str, &str)]| -> HashMap<String, Vec<String>> {
        let mut m: HashMap<String, Vec<String>> = HashMap::new();
        for (k, v) in pairs {
            m.entry(k.to_string()).or_default().push(v.to_string());
        }
        m
    };
    for f in &requests {
        let get = |k: &str| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let action = get("Action").unwrap();
        seen.insert(action.to_string());
        assert!(
            fleetlb_controller::provider::aws::EC2_OPERATIONS.contains(&action),
            "{action} is not in the list the policy is made from"
        );
        let ec2 = format!("ec2:{action}");
        match action {
            "DescribeInstances" => assert!(allows(&policy, &ec2, "instance", &ctx(&[]))),
            "RunInstances" => {
                // Tags per resource type, as IAM sees them in the request:
                // TagSpecification.N.ResourceType and TagSpecification.N.Tag.M.Key/Value.
                type Spec = (String, std::collections::BTreeMap<String, (String, String)>);
                let mut specs: std::collections::BTreeMap<String, Spec> = Default::default();
                for (k, v) in f {
                    let Some(rest) = k.strip_prefix("TagSpecification.") else {
                        continue;
                    };
                    let (n, field) = rest.split_once('.').unwrap();
                    let spec = specs.entry(n.to_string()).or_default();
                    if field == "ResourceType" {
                        spec.0 = v.clone();
                    } else if let Some((m, part)) =
                        field.strip_prefix("Tag.").and_then(|t| t.split_once('.'))
                    {
                        let tag = spec.1.entry(m.to_string()).or_default();
                        match part {
                            "Key" => tag.0 = v.clone(),
                            _ => tag.1 = v.clone(),
                        }
                    }
                }
                let mut tags_of: HashMap<String, Vec<(String, String)>> = HashMap::new();
                for (rtype, tags) in specs.into_values() {
                    tags_of.entry(rtype).or_default().extend(tags.into_values());
                }
                // Every resource type RunInstances creates is allowed with its request tags,
                // and so is tagging it at creation (a spot launch's request included).
                assert!(
                    tags_of.contains_key("spot-instances-request"),
                    "a spot launch tags its spot request: {tags_of:?}"
                );
                let mut created: Vec<String> = ["instance", "volume", "network-interface"]
                    .map(String::from)
                    .to_vec();
                created.extend(
                    tags_of
                        .keys()
                        .filter(|k| !created.contains(k))
                        .cloned()
                        .collect::<Vec<_>>(),
                );
                for created in created.iter().map(String::as_str) {
                    let tags = tags_of.get(created).cloned().unwrap_or_default();
                    let mut c: HashMap<String, Vec<String>> = HashMap::new();
                    for (k, v) in &tags {
                        c.entry(format!("aws:RequestTag/{k}"))
                            .or_default()
                            .push(v.clone());
                    }
                    assert!(
                        allows(&policy, &ec2, created, &c),
                        "RunInstances would be UnauthorizedOperation on {created} (tags {tags:?})"
                    );
                    c.insert("ec2:CreateAction".into(), vec!["RunInstances".into()]);
                    assert!(allows(&policy, "ec2:CreateTags", created, &c), "{created}");
                }
                assert!(allows(&policy, &ec2, "image", &ctx(&[])));
                // The root volume of an EBS-backed image comes from its snapshot.
                assert!(allows(&policy, &ec2, "snapshot", &ctx(&[])));
                if get("SubnetId").is_some() {
                    assert!(allows(&policy, &ec2, "subnet", &ctx(&[])));
                }
            }
            "TerminateInstances" | "DeleteTags" => {
                let ids: Vec<&str> = f
                    .iter()
                    .filter(|(k, _)| k.starts_with("InstanceId.") || k.starts_with("ResourceId."))
                    .map(|(_, v)| v.as_str())
                    .collect();
                assert!(!ids.is_empty());
                let keys: Vec<&str> = f
                    .iter()
                    .filter(|(k, _)| k.starts_with("Tag.") && k.ends_with(".Key"))
                    .map(|(_, v)| v.as_str())
                    .collect();
                for i in ids {
                    let tag = owner.get(i).map(String::as_str).unwrap_or("");
                    let mut c = ctx(&[("aws:ResourceTag/fleetlb.dev/controller", tag)]);
                    if action == "DeleteTags" {
                        c.insert(
                            "aws:TagKeys".into(),
                            keys.iter().map(|k| k.to_string()).collect(),
                        );
                    }
                    assert!(
                        allows(&policy, &ec2, "instance", &c),
                        "{action} on {i} ({tag})"
                    );
                }
            }
            other => panic!("unexpected call {other}"),
        }
    }
    assert_eq!(
        seen.iter().map(String::as_str).collect::<Vec<_>>(),
        [
            "DeleteTags",
            "DescribeInstances",
            "RunInstances",
            "TerminateInstances"
        ],
        "the scenario exercises every call"
    );

    // Nothing broader: the policy names exactly these actions, and refuses another install's
    // instances, untagged network interfaces, and any other tag key.
    let mut actions: Vec<String> = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| match &s["Action"] {
            serde_json::Value::String(a) => vec![a.clone()],
            serde_json::Value::Array(a) => {
                a.iter().map(|x| x.as_str().unwrap().to_string()).collect()
            }
            _ => vec![],
        })
        .collect();
    actions.sort();
    actions.dedup();
    assert_eq!(
        actions,
        [
            "ec2:CreateTags",
            "ec2:DeleteTags",
            "ec2:DescribeInstances",
            "ec2:RunInstances",
            "ec2:TerminateInstances",
            "iam:PassRole"
        ]
    );
    let other = ctx(&[("aws:ResourceTag/fleetlb.dev/controller", "someone-else")]);
    assert!(!allows(
        &policy,
        "ec2:TerminateInstances",
        "instance",
        &other
    ));
    let mut other_keys = other.clone();
    other_keys.insert("aws:TagKeys".into(), vec![tags::CONTROLLER.into()]);
    assert!(!allows(&policy, "ec2:DeleteTags", "instance", &other_keys));
    let mut mine_other_key = ctx(&[("aws:ResourceTag/fleetlb.dev/controller", id)]);
    mine_other_key.insert("aws:TagKeys".into(), vec!["team".into()]);
    assert!(!allows(
        &policy,
        "ec2:DeleteTags",
        "instance",
        &mine_other_key
    ));
    assert!(!allows(
        &policy,
        "ec2:RunInstances",
        "network-interface",
        &ctx(&[])
    ));
    assert!(!allows(
        &policy,
        "ec2:RunInstances",
        "instance",
        &ctx(&[("aws:RequestTag/fleetlb.dev/controller", "someone-else")])
    ));
    assert!(!allows(
        &policy,
        "ec2:RunInstances",
        "launch-template",
        &ctx(&[])
    ));
    for s in policy["Statement"].as_array().unwrap() {
        if s["Resource"] == "*" {
            assert_eq!(
                s["Action"],
                serde_json::json!(["ec2:DescribeInstances"]),
                "{s}"
            );
        }
    }
}

/// An HTTP server on 127.0.0.1 answering 200 to everything (a static endpoint).
async fn ok_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"ok")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_moved_to_another_provider_retires_the_old_providers_instances() {
    let env = env().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.yaml"), yaml(&env, "web", 1, "Delete")).unwrap();
    let mut d = driver(&env, dir.path(), "ctl-move");
    // Probes run here: the static endpoint must pass its health check before the EC2
    // instance may go (surge-first).
    let _probes = d.dataplane.watch_routes(d._rx.clone());
    converge(&mut d, &env, "ctl-move", "web", 1).await;
    let (addr, _server) = ok_server().await;
    std::fs::write(
        dir.path().join("web.yaml"),
        format!(
            "apiVersion: fleetlb.dev/v1alpha1\nkind: BackendCluster\nmetadata:\n  name: web\nspec:\n  route: /web\n  replicas: 1\n  instanceType: t2.micro\n  healthCheck:\n    intervalSeconds: 1\n    timeoutSeconds: 1\n    healthyThreshold: 2\n    unhealthyThreshold: 2\n  provider:\n    static:\n      endpoints: [\"{addr}\"]\n"
        ),
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        d.driver.step(&d.out).await;
        if live(&env.ec2, "ctl-move", "web").await.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the aws instance of a cluster now on static was never terminated: {}",
            status(&d)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let v = status(&d);
    assert_eq!(v["clusters"][0]["status"]["readyReplicas"], 1, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_stops_leading_sends_no_mutating_ec2_request() {
    let env = env().await;
    let proxy = FaultProxy::start(&env._moto.url).await;
    let conf = sdk_config(&proxy.url);
    let registry = prometheus::Registry::new();
    let (leader_tx, leader) = watch::channel(true);
    let p = AwsProvider::with_options(
        &conf,
        "ctl-gate".into(),
        Metrics::new(&registry).unwrap(),
        fleetlb_controller::provider::aws::Timeouts::default(),
        Some(leader),
    );
    let mut req = solo_request(&env, &env.subnets);
    req.token_scope = "ctl-gate".into();
    let fleetlb_controller::provider::Launch::Made(i) = p.launch(&req).await.unwrap() else {
        panic!("a leader launches")
    };
    let sent = proxy.count("RunInstances");
    // Leadership ends (the renew deadline passed while this call was being prepared): the
    // check sits right before the request goes out, retries included.
    leader_tx.send_replace(false);
    req.slot = 1;
    let e = p.launch(&req).await.unwrap_err().to_string();
    assert!(e.contains("NotLeader"), "{e}");
    let e = p
        .terminate(std::slice::from_ref(&i.id))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("NotLeader"), "{e}");
    let e = p
        .release(std::slice::from_ref(&i.id))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("NotLeader"), "{e}");
    assert_eq!(proxy.count("RunInstances"), sent);
    assert_eq!(proxy.count("TerminateInstances"), 0);
    assert_eq!(proxy.count("DeleteTags"), 0);
    // Reading goes on (a follower serves from what it lists).
    assert!(p.list(&[]).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subnet_without_capacity_means_the_next_attempt_with_its_own_token() {
    let env = env().await;
    let proxy = FaultProxy::start(&env._moto.url).await;
    let conf = sdk_config(&proxy.url);
    // Slot 0's first attempt goes to the first subnet, which has no capacity.
    proxy.no_capacity_in(&env.subnets[0]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.yaml"), yaml(&env, "web", 1, "Delete")).unwrap();
    let mut d = driver_with(&conf, dir.path(), "ctl-cap", |_| {});
    converge(&mut d, &env, "ctl-cap", "web", 1).await;
    let runs = proxy.run_fields(["ClientToken", "SubnetId"]);
    let mut pairs = runs.clone();
    pairs.dedup();
    assert_eq!(
        pairs.len(),
        2,
        "one refused attempt, then the next: {runs:?}"
    );
    assert_eq!(pairs[0][1], env.subnets[0]);
    assert_eq!(
        pairs[1][1], env.subnets[1],
        "the next attempt is the next subnet"
    );
    assert_ne!(
        pairs[0][0], pairs[1][0],
        "the next attempt has its own token"
    );
    let i = &live(&env.ec2, "ctl-cap", "web").await[0];
    assert_eq!(tag(i, tags::ATTEMPT), Some("1"));
    // The status records the attempt that was really launched.
    let l = &status(&d)["clusters"][0]["status"]["launches"][0];
    assert_eq!(l["attempt"], 1, "{l}");
    assert_eq!(l["clientToken"], pairs[1][0].as_str());
    assert_eq!(l["subnetId"], env.subnets[1].as_str());
    // A restarted controller with no memory of the capacity error launches nothing more.
    let mut fresh = driver_with(&conf, dir.path(), "ctl-cap", |_| {});
    fresh.driver.step(&fresh.out).await;
    assert_eq!(live(&env.ec2, "ctl-cap", "web").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_then_on_demand_falls_back_where_spot_has_no_capacity() {
    let env = env().await;
    let proxy = FaultProxy::start(&env._moto.url).await;
    let conf = sdk_config(&proxy.url);
    // No spot capacity anywhere; on-demand is fine.
    proxy.no_spot_capacity();
    let dir = tempfile::tempdir().unwrap();
    let text = spot_yaml(&yaml(&env, "web", 1, "Delete"), "spot-then-on-demand");
    std::fs::write(dir.path().join("web.yaml"), text).unwrap();
    let mut d = driver_with(&conf, dir.path(), "ctl-spot", |_| {});
    converge(&mut d, &env, "ctl-spot", "web", 1).await;
    let runs: Vec<(String, bool, String)> = proxy
        .run_fields([
            "ClientToken",
            "InstanceMarketOptions.MarketType",
            "SubnetId",
        ])
        .into_iter()
        .map(|[token, market, subnet]| (token, market == "spot", subnet))
        .collect();
    let mut tried = runs.clone();
    tried.dedup();
    // Spot, then on-demand in the same subnet (the slot keeps its zone), each its own
    // attempt and token.
    assert_eq!(tried.len(), 2, "{tried:?}");
    assert!(tried[0].1 && !tried[1].1, "{tried:?}");
    assert!(
        tried.iter().all(|(_, _, s)| *s == env.subnets[0]),
        "{tried:?}"
    );
    let mut tokens: Vec<&String> = tried.iter().map(|(t, _, _)| t).collect();
    tokens.sort();
    tokens.dedup();
    assert_eq!(
        tokens.len(),
        tried.len(),
        "one token per attempt: {tried:?}"
    );
    let i = &live(&env.ec2, "ctl-spot", "web").await[0];
    assert_eq!(i.instance_lifecycle(), None, "the instance is on-demand");
    // An Event says what was passed over and why.
    let doc = status(&d);
    let skipped = notes(&d, "CapacitySkipped");
    assert!(
        skipped
            .iter()
            .any(|n| n.contains("t2.micro spot in subnet-")
                && n.contains("InsufficientInstanceCapacity")),
        "{:?}",
        doc["clusters"][0]["events"]
    );

    // `spot`: the launch is a tagged spot request, and the instance a spot instance.
    let proxy = FaultProxy::start(&env._moto.url).await;
    let conf = sdk_config(&proxy.url);
    let dir = tempfile::tempdir().unwrap();
    let text = spot_yaml(&yaml(&env, "cheap", 1, "Delete"), "spot");
    std::fs::write(dir.path().join("cheap.yaml"), text).unwrap();
    let mut d = driver_with(&conf, dir.path(), "ctl-spot2", |_| {});
    converge(&mut d, &env, "ctl-spot2", "cheap", 1).await;
    let run = proxy.run_instances().swap_remove(0);
    let has = |k: &str, v: &str| run.iter().any(|(a, b)| a == k && b == v);
    assert!(has("InstanceMarketOptions.MarketType", "spot"), "{run:?}");
    assert!(
        run.iter().any(|(k, v)| k.starts_with("TagSpecification.")
            && k.ends_with(".ResourceType")
            && v == "spot-instances-request"),
        "{run:?}"
    );
    let i = &live(&env.ec2, "ctl-spot2", "cheap").await[0];
    assert_eq!(
        i.instance_lifecycle(),
        Some(&aws_sdk_ec2::types::InstanceLifecycleType::Spot)
    );
    // Status says what serves: `kubectl get bc`'s CAPACITY column and each instance.
    let st = &status(&d)["clusters"][0]["status"];
    assert_eq!(st["capacity"], "1 x t2.micro spot", "{st}");
    let inst = &st["instances"][0];
    assert_eq!(inst["capacityType"], "spot", "{inst}");
    assert_eq!(inst["instanceType"], "t2.micro", "{inst}");
    assert!(
        inst["zone"]
            .as_str()
            .is_some_and(|z| z.starts_with("us-east-1")),
        "{inst}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_without_capacity_in_one_zone_gives_way_to_the_next_type_there() {
    let env = env().await;
    let proxy = FaultProxy::start(&env._moto.url).await;
    let conf = sdk_config(&proxy.url);
    // Slot 0 starts in the first subnet, where t2.micro has no capacity.
    proxy.no_capacity_for("t2.micro", &env.subnets[0]);
    let text = yaml(&env, "web", 3, "Delete").replace(
        "  instanceType: t2.micro\n",
        "  instanceTypes: [t2.micro, t2.small]\n",
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.yaml"), text).unwrap();
    let mut d = driver_with(&conf, dir.path(), "ctl-types", |_| {});
    converge(&mut d, &env, "ctl-types", "web", 3).await;
    let runs = proxy.run_fields(["ClientToken", "InstanceType", "SubnetId"]);
    let refused: Vec<_> = runs
        .iter()
        .filter(|[_, t, s]| t == "t2.micro" && *s == env.subnets[0])
        .collect();
    assert!(!refused.is_empty(), "{runs:?}");
    // The next type in the same zone, with its own token: the spread stays one per zone.
    let running = live(&env.ec2, "ctl-types", "web").await;
    let mut zones: Vec<String> = running
        .iter()
        .map(|i| {
            i.placement()
                .and_then(|p| p.availability_zone())
                .unwrap()
                .to_string()
        })
        .collect();
    zones.sort();
    zones.dedup();
    assert_eq!(zones.len(), 3, "one instance per zone: {runs:?}");
    let in_first: Vec<_> = running
        .iter()
        .filter(|i| i.subnet_id() == Some(env.subnets[0].as_str()))
        .collect();
    assert_eq!(in_first.len(), 1);
    assert_eq!(
        in_first[0].instance_type().map(|t| t.as_str()),
        Some("t2.small"),
        "{runs:?}"
    );
    let small = runs
        .iter()
        .find(|[_, t, s]| t == "t2.small" && *s == env.subnets[0])
        .unwrap();
    assert_ne!(
        &small[0], &refused[0][0],
        "the next attempt has its own token"
    );
    let st = &status(&d)["clusters"][0]["status"];
    assert_eq!(
        st["capacity"], "2 x t2.micro on-demand, 1 x t2.small on-demand",
        "{st}"
    );
    // A restarted controller launches nothing more and replaces nothing (both types are wanted).
    let mut fresh = driver_with(&conf, dir.path(), "ctl-types", |_| {});
    fresh.driver.step(&fresh.out).await;
    assert_eq!(live(&env.ec2, "ctl-types", "web").await.len(), 3);
}

/// Whether the ARN pattern `pattern` (`*` for a whole field) covers `arn`.
fn arn_covers(pattern: &str, arn: &str) -> bool {
    let (p, a): (Vec<&str>, Vec<&str>) = (pattern.split(':').collect(), arn.split(':').collect());
    p.len() == a.len() && p.iter().zip(&a).all(|(p, a)| *p == "*" || p == a)
}

/// An EventBridge event as SQS delivers it to the queue.
fn eventbridge(source: &str, detail_type: &str, detail: serde_json::Value) -> String {
    serde_json::json!({
        "version": "0", "id": "0d1f5e3c-7b9a-4c1e-9d2f-5a6b7c8d9e0f",
        "detail-type": detail_type, "source": source, "account": "123456789012",
        "time": "2026-12-06T12:00:00Z", "region": "us-east-1", "resources": [],
        "detail": detail,
    })
    .to_string()
}

/// A spot interruption warning on the queue (EventBridge's event, as SQS delivers it): the
/// instance leaves the endpoint set at once, its replacement is launched in the same pass,
/// it is terminated, and the message is deleted; a warning about an instance that is not
/// fleetlb's and a message fleetlb does not act on are deleted and change nothing. The poller
/// reaches SQS through the fault proxy, so every call it makes is checked against the IAM
/// policy generated for the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interruption_warning_drains_and_replaces_the_instance_and_deletes_the_message() {
    use fleetlb_controller::interruption::{self, Notices};
    let env = env().await;
    let proxy = FaultProxy::start(&env._moto.url).await;
    let conf = sdk_config(&proxy.url);
    // The queue, and what EventBridge sends, straight to moto (not the controller's calls).
    let sqs = aws_sdk_sqs::Client::new(&env.conf);
    let queue = "fleetlb-interruptions";
    let url = sqs
        .create_queue()
        .queue_name(queue)
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_string();
    let send = |body: String| {
        let (sqs, url) = (sqs.clone(), url.clone());
        async move {
            sqs.send_message()
                .queue_url(url)
                .message_body(body)
                .send()
                .await
                .unwrap();
        }
    };
    let notices = Arc::new(Notices::default());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("web.yaml"),
        spot_yaml(&yaml(&env, "web", 2, "Delete"), "spot"),
    )
    .unwrap();
    let shared = notices.clone();
    let mut d = driver_with(&conf, dir.path(), "ctl-int", move |cfg| {
        cfg.core.notices = shared;
        // A drain period, so the warned instance is still there (draining) after the pass
        // that retires it, and its message must still be held.
        cfg.core.drain = Duration::from_secs(3);
    });
    converge(&mut d, &env, "ctl-int", "web", 2).await;
    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(&registry).unwrap();
    let poller = tokio::spawn(interruption::run(
        interruption::client_from(&conf, None),
        queue.into(),
        notices.clone(),
        metrics.clone(),
        None,
    ));
    let ids = |v: Vec<aws_sdk_ec2::types::Instance>| -> Vec<String> {
        v.iter()
            .map(|i| i.instance_id().unwrap().to_string())
            .collect()
    };
    let instances = live(&env.ec2, "ctl-int", "web").await;
    let before = ids(instances.clone());
    let victim = before[0].clone();
    let victim_subnet = instances[0].subnet_id().unwrap().to_string();
    let runs_before = proxy.run_instances().len();
    send(eventbridge(
        "aws.ec2",
        "EC2 Spot Instance Interruption Warning",
        serde_json::json!({"instance-id": victim, "instance-action": "terminate"}),
    ))
    .await;
    send(eventbridge(
        "aws.ec2",
        "EC2 Spot Instance Interruption Warning",
        serde_json::json!({"instance-id": "i-0123456789abcdef0", "instance-action": "terminate"}),
    ))
    .await;
    send("{\"Service\":\"Amazon S3\",\"Event\":\"s3:TestEvent\"}".into()).await;
    // The poller records the warning.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !(notices.interrupted().contains_key(&victim)
        && notices.interrupted().contains_key("i-0123456789abcdef0"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the warning was never received"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One pass: out of the endpoint set, replaced, said in an Event.
    d.driver.step(&d.out).await;
    let s = status(&d);
    let cluster = &s["clusters"][0];
    let endpoints: Vec<&str> = cluster["status"]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert!(!endpoints.contains(&victim.as_str()), "{endpoints:?}");
    let interrupted = notes(&d, "Interrupted");
    assert_eq!(interrupted.len(), 1, "{}", cluster["events"]);
    let held = sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(
            aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        )
        .send()
        .await
        .unwrap();
    let held: u64 = held
        .attributes()
        .and_then(|a| {
            a.get(&aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // The S3 test event may not be deleted yet either.
    assert!(
        held >= 2,
        "the warning and the one about an unknown instance stay in the queue while their instances may still be running: {held} held"
    );
    assert!(
        interrupted[0].starts_with(&format!("{victim}: a spot interruption warning;")),
        "{interrupted:?}"
    );
    // Then: terminated, two others live, every message deleted (the one about an instance no
    // listing shows after 10 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let attrs = || async {
        let out = sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
            .send()
            .await
            .unwrap();
        let get = |k: aws_sdk_sqs::types::QueueAttributeName| {
            out.attributes()
                .and_then(|a| a.get(&k))
                .map_or(-1, |v| v.parse::<i64>().unwrap())
        };
        get(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
            + get(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
    };
    loop {
        d.driver.step(&d.out).await;
        let now = ids(live(&env.ec2, "ctl-int", "web").await);
        let gone = states(&env, "ctl-int", "web")
            .await
            .iter()
            .any(|(id, s)| id == &victim && (s == "terminated" || s == "shutting-down"));
        if gone && now.len() == 2 && !now.contains(&victim) && attrs().await == 0 {
            assert!(notices.is_empty());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "victim gone: {gone}, live: {now:?}, messages left: {}",
            attrs().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Its spot pool is being reclaimed: the replacement was not asked of it, and the Event
    // says why.
    let runs =
        proxy.run_fields(["SubnetId", "InstanceMarketOptions.MarketType"])[runs_before..].to_vec();
    assert!(!runs.is_empty());
    assert!(
        runs.iter().all(|[subnet, _]| subnet != &victim_subnet),
        "a spot launch in the interrupted pool {victim_subnet}: {runs:?}"
    );
    let skipped = notes(&d, "CapacitySkipped").iter().any(|n| {
        n.contains(&format!(
            "a spot interruption warning: {victim_subnet} has no spot t2.micro capacity"
        ))
    });
    assert!(skipped, "{}", status(&d)["clusters"][0]["events"]);
    // The other instance was never touched.
    let after = ids(live(&env.ec2, "ctl-int", "web").await);
    assert!(after.contains(&before[1]), "{after:?}");
    let count = |kind: &str| {
        metrics
            .interruption_messages
            .with_label_values(&[kind])
            .get()
    };
    assert_eq!(
        (count("spot_interruption"), count("ignored")),
        (2, 1),
        "every message counted by what it announced"
    );
    poller.abort();

    // Every SQS call was one the generated policy allows on this queue, and they were all
    // the policy names.
    let policy = fleetlb_controller::iam::policy(&fleetlb_controller::iam::PolicyOptions {
        controller_id: "ctl-int".into(),
        partition: "aws".into(),
        instance_role: "fleetlb-instance".into(),
        interruption_queue: Some(queue.into()),
    });
    let statement = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["Sid"] == "ReadTheInterruptionQueue")
        .unwrap()
        .clone();
    let mut seen = std::collections::BTreeSet::new();
    for f in proxy.requests().iter().map(|b| support::form(b)) {
        if support::field(&f, "Service").as_deref() != Some("sqs") {
            continue;
        }
        let action = support::field(&f, "Action").unwrap();
        assert!(
            fleetlb_controller::iam::SQS_OPERATIONS.contains(&action.as_str()),
            "{action} is not in the list the policy is made from"
        );
        let queue_arn = format!("arn:aws:sqs:us-east-1:123456789012:{queue}");
        assert!(
            statement["Action"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!(format!("sqs:{action}")))
                && arn_covers(statement["Resource"].as_str().unwrap(), &queue_arn),
            "{action} on {queue_arn} is not allowed by {statement}"
        );
        seen.insert(action);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["DeleteMessage", "GetQueueUrl", "ReceiveMessage"]
    );
    assert!(!arn_covers(
        statement["Resource"].as_str().unwrap(),
        "arn:aws:sqs:us-east-1:123456789012:another-queue"
    ));
}

/// Types of both architectures, one AMI each: t4g.small launches from `arm64ImageId`, the
/// t3.small that stands in for it where t4g has no capacity from `imageId`; neither is drift
/// for carrying its own architecture's image, so nothing is replaced afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_type_launches_from_its_architectures_image() {
    let env = env().await;
    let images = env.ec2.describe_images().send().await.unwrap();
    let arm = images
        .images()
        .iter()
        .filter_map(|i| i.image_id())
        .find(|i| *i != env.image)
        .expect("moto has a second image")
        .to_string();
    let proxy = FaultProxy::start(&env._moto.url).await;
    let conf = sdk_config(&proxy.url);
    proxy.no_capacity_for("t4g.small", &env.subnets[0]);
    let text = yaml(&env, "web", 3, "Delete")
        .replace(
            "  instanceType: t2.micro\n",
            "  instanceTypes: [t4g.small, t3.small]\n",
        )
        .replace(
            &format!("      imageId: {}\n", env.image),
            &format!("      imageId: {}\n      arm64ImageId: {arm}\n", env.image),
        );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.yaml"), text).unwrap();
    let mut d = driver_with(&conf, dir.path(), "ctl-arch", |_| {});
    converge(&mut d, &env, "ctl-arch", "web", 3).await;
    let runs = proxy.run_fields(["InstanceType", "ImageId", "SubnetId"]);
    for [t, image, _] in &runs {
        let want = if t == "t4g.small" { &arm } else { &env.image };
        assert_eq!(image, want, "{t} launched from the wrong image: {runs:?}");
    }
    let mut launched: Vec<(String, String)> = live(&env.ec2, "ctl-arch", "web")
        .await
        .iter()
        .map(|i| {
            (
                i.instance_type().unwrap().as_str().to_string(),
                i.subnet_id().unwrap().to_string(),
            )
        })
        .collect();
    launched.sort();
    let mut want = vec![
        ("t3.small".to_string(), env.subnets[0].clone()),
        ("t4g.small".to_string(), env.subnets[1].clone()),
        ("t4g.small".to_string(), env.subnets[2].clone()),
    ];
    want.sort();
    assert_eq!(launched, want, "{runs:?}");
}

/// `MaxSpotInstanceCountExceeded` is the account's spot limit, not one pool's: after the first
/// refusal no other type or subnet is asked for spot for 3 minutes, and spot-then-on-demand
/// goes on-demand everywhere with the spread kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_accounts_spot_limit_stops_spot_requests_everywhere() {
    let env = env().await;
    let proxy = FaultProxy::start(&env._moto.url).await;
    let conf = sdk_config(&proxy.url);
    proxy.refuse_spot_with("MaxSpotInstanceCountExceeded");
    let dir = tempfile::tempdir().unwrap();
    let text = spot_yaml(&yaml(&env, "web", 3, "Delete"), "spot-then-on-demand");
    std::fs::write(dir.path().join("web.yaml"), text).unwrap();
    let mut d = driver_with(&conf, dir.path(), "ctl-limit", |_| {});
    converge(&mut d, &env, "ctl-limit", "web", 3).await;
    let runs = proxy.run_fields(["InstanceMarketOptions.MarketType", "SubnetId"]);
    let spot = runs.iter().filter(|[m, _]| m == "spot").count();
    assert_eq!(spot, 1, "one refusal says it for the account: {runs:?}");
    let mut subnets: Vec<String> = live(&env.ec2, "ctl-limit", "web")
        .await
        .iter()
        .map(|i| i.subnet_id().unwrap().to_string())
        .collect();
    subnets.sort();
    let mut want = env.subnets.clone();
    want.sort();
    assert_eq!(subnets, want, "one on-demand instance per subnet: {runs:?}");
}
