//! The aws provider and the reconcile loop against a real `moto_server` on 127.0.0.1, reached
//! through aws-sdk-ec2 with the endpoint overridden. No traffic goes to the instances' (fake,
//! private) addresses: the data plane's route table is published but no prober runs here.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetlb_controller::Providers;
use fleetlb_controller::aws::{AwsProvider, tags};
use fleetlb_controller::metrics::Metrics;
use fleetlb_controller::provider::{ClusterKey, LaunchRequest, Provider};
use fleetlb_controller::standalone::{Outputs, Standalone, StandaloneConfig};
use fleetlb_dataplane::{Dataplane, ProxyConfig, RouteTable};
use tokio::sync::watch;

mod support;
use support::{Env, Fault, FaultProxy, env, sdk_config};

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
    let timeouts = fleetlb_controller::aws::Timeouts {
        connect: Duration::from_secs(2),
        attempt: Duration::from_millis(500),
        operation: Duration::from_secs(3),
    };
    let aws = AwsProvider::with_timeouts(conf, controller_id.into(), metrics.clone(), timeouts);
    let providers = Providers {
        aws: Some(Arc::new(aws)),
        ..Default::default()
    };
    // The data plane is only a health source here; nothing probes the fake addresses.
    let dataplane = Dataplane::new(ProxyConfig::default(), &registry).unwrap();
    let mut cfg = StandaloneConfig::new(dir.to_path_buf());
    cfg.drain = Duration::ZERO;
    cfg.orphan_grace = Duration::ZERO;
    tune(&mut cfg);
    let (routes, rx) = watch::channel(RouteTable::default());
    let (status, status_rx) = watch::channel(Bytes::new());
    let (ready, _) = watch::channel(false);
    Driver {
        driver: Standalone::new(cfg, providers, dataplane, metrics),
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
        env.subnets.len().min(2),
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
        serde_yaml::from_str::<serde_yaml::Value>(&yaml(&env, "solo", 1, "Delete"))
            .ok()
            .and_then(|v| serde_json::from_value(serde_json::to_value(v).unwrap()).ok())
            .unwrap();
    let req = LaunchRequest {
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
    };
    let first = p.launch(&req).await.unwrap();
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
        Some(fleetlb_controller::aws::client_token("uid-solo", 0, "h", 0))
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
        c.launch_backoff = (Duration::from_secs(3600), Duration::from_secs(3600));
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
        let budget = Duration::from_millis(rng.u64(0..120));
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
