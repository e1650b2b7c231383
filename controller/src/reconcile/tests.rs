use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use fleetlb_crds::{BackendCluster, BackendClusterSpec, LocalProvider, ProviderSpec};

use super::*;

fn bc(replicas: i32, instance_type: &str) -> BackendCluster {
    let mut bc = BackendCluster::new(
        "cluster1",
        BackendClusterSpec {
            route: "/cluster1".into(),
            hosts: Vec::new(),
            weight: None,
            https_redirect: false,
            replicas,
            instance_type: Some(instance_type.into()),
            instance_types: Vec::new(),
            port: 8000,
            protocol: Default::default(),
            capacity_type: Default::default(),
            provider: ProviderSpec::Local(LocalProvider::default()),
            health_check: Default::default(),
            balancing: Default::default(),
            outlier_detection: Default::default(),
            timeout_seconds: 30,
            timeouts: None,
            deletion_policy: Default::default(),
            deregistration_delay_seconds: None,
            rollout: Default::default(),
            autoscaling: None,
        },
    );
    bc.metadata.generation = Some(1);
    bc
}

/// `bc(replicas, "t3.small")` on AWS with three subnets (`subnet-a`..`subnet-c`).
fn aws3(replicas: i32) -> BackendCluster {
    let mut b = bc(replicas, "t3.small");
    b.spec.provider = serde_json::from_value(serde_json::json!({
        "aws": {"imageId": "ami-0123456789abcdef0", "subnetIds": ["subnet-a", "subnet-b", "subnet-c"]}
    }))
    .unwrap();
    b
}

/// `b` with one launch intent recorded for slot 0, answered by `instance_id` if given.
fn with_intent(
    mut b: BackendCluster,
    attempt: u32,
    subnet: &str,
    instance_id: Option<&str>,
) -> BackendCluster {
    b.status = Some(fleetlb_crds::BackendClusterStatus {
        launches: vec![fleetlb_crds::LaunchIntent {
            slot: 0,
            attempt,
            client_token: format!("token-{attempt}"),
            subnet_id: Some(subnet.into()),
            instance_id: instance_id.map(String::from),
            recorded_at: None,
        }],
        ..Default::default()
    });
    b
}

fn inst(bc: &BackendCluster, id: &str, slot: u32, state: InstanceState, age_s: u64) -> Instance {
    Instance {
        id: id.into(),
        owner: ClusterKey::of(bc),
        owner_uid: "uid-1".into(),
        slot,
        attempt: 0,
        address: Some(format!("127.0.0.1:{}", 9000 + slot).parse().unwrap()),
        state,
        instance_type: bc.spec.instance_types_joined(),
        spec_hash: spec_hash(bc),
        launched_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 - age_s),
        launched_as: None,
        client_token: None,
        provider: crate::provider::ProviderKind::Local,
    }
}

fn run(bc: &BackendCluster, instances: &[Instance], healthy: &[&str]) -> Plan {
    run_interrupted(bc, instances, healthy, &HashMap::new())
}

/// [`run`] with the interruption queue's notices.
fn run_interrupted(
    bc: &BackendCluster,
    instances: &[Instance],
    healthy: &[&str],
    interrupted: &HashMap<String, crate::interruption::Kind>,
) -> Plan {
    let refs: Vec<&Instance> = instances.iter().collect();
    let health: HashMap<String, Health> = healthy
        .iter()
        .map(|id| {
            (
                id.to_string(),
                Health {
                    healthy: true,
                    latency_ms: Some(1.0),
                },
            )
        })
        .collect();
    let draining = HashSet::new();
    plan(
        bc,
        "uid-1",
        &Observed {
            instances: &refs,
            health: &health,
            draining: &draining,
            interrupted,
            managed: true,
            token_scope: "",
            launch_visibility: std::time::Duration::from_secs(120),
        },
        Timestamp::UNIX_EPOCH,
    )
}

fn cond<'a>(p: &'a Plan, t: &str) -> &'a Condition {
    condition(&p.status, t).expect("condition set")
}

#[test]
fn empty_cluster_launches_every_slot_and_is_not_ready() {
    let b = bc(4, "t2.micro");
    let p = run(&b, &[], &[]);
    let slots: Vec<u32> = p.launch.iter().map(|l| l.slot).collect();
    assert_eq!(slots, vec![0, 1, 2, 3]);
    assert_eq!(cond(&p, "Ready").status, "False");
    assert_eq!(cond(&p, "Ready").reason, "Launching");
    assert_eq!(cond(&p, "Progressing").status, "True");
}

#[test]
fn running_but_unproven_instances_are_not_ready() {
    let b = bc(2, "t2.micro");
    let is = [
        inst(&b, "i-a", 0, InstanceState::Running, 10),
        inst(&b, "i-b", 1, InstanceState::Running, 10),
    ];
    let p = run(&b, &is, &["i-a"]);
    assert!(p.launch.is_empty());
    assert_eq!(p.status.ready_replicas, 1);
    assert_eq!(cond(&p, "Ready").status, "False");
    assert_eq!(cond(&p, "Ready").reason, "HealthCheckFailing");
    assert_eq!(cond(&p, "Degraded").status, "True");
    // The healthy one ranks first.
    assert_eq!(p.endpoints[0].id, "i-a");
}

#[test]
fn all_healthy_is_ready_and_stable() {
    let b = bc(2, "t2.micro");
    let is = [
        inst(&b, "i-a", 0, InstanceState::Running, 10),
        inst(&b, "i-b", 1, InstanceState::Running, 10),
    ];
    let p = run(&b, &is, &["i-a", "i-b"]);
    assert_eq!(cond(&p, "Ready").status, "True");
    assert_eq!(cond(&p, "Progressing").reason, "Stable");
    assert_eq!(p.status.observed_generation, Some(1));
}

#[test]
fn scale_down_retires_unhealthy_first_then_newest() {
    let b = bc(2, "t2.micro");
    let is = [
        inst(&b, "i-old", 0, InstanceState::Running, 100),
        inst(&b, "i-sick", 1, InstanceState::Running, 90),
        inst(&b, "i-new", 2, InstanceState::Running, 1),
        inst(&b, "i-mid", 3, InstanceState::Running, 50),
    ];
    let p = run(&b, &is, &["i-old", "i-new", "i-mid"]);
    let mut retired = p.retire.clone();
    retired.sort();
    assert_eq!(retired, vec!["i-new", "i-sick"]);
    assert!(
        p.endpoints.iter().all(|e| !p.retire.contains(&e.id)),
        "a victim kept receiving traffic"
    );
}

#[test]
fn dead_instances_are_replaced_in_their_slot() {
    let b = bc(2, "t2.micro");
    let is = [
        inst(&b, "i-a", 0, InstanceState::Running, 10),
        inst(&b, "i-dead", 1, InstanceState::Terminated, 10),
    ];
    let p = run(&b, &is, &["i-a"]);
    assert_eq!(p.launch.len(), 1);
    assert_eq!(p.launch[0].slot, 1);
    assert_eq!(
        p.launch[0].attempt, 1,
        "a replacement is a new launch intent"
    );
}

#[test]
fn drift_is_replaced_surge_first() {
    let old = bc(2, "t2.micro");
    let mut new = bc(2, "t2.large");
    new.spec.rollout.max_surge_percent = 100;
    let mut is = vec![
        inst(&old, "i-o1", 0, InstanceState::Running, 10),
        inst(&old, "i-o2", 1, InstanceState::Running, 10),
    ];
    let p = run(&new, &is, &["i-o1", "i-o2"]);
    assert_eq!(
        p.launch.len(),
        2,
        "replacements launch before anything retires"
    );
    assert!(p.retire.is_empty());
    assert_eq!(p.endpoints.len(), 2, "old instances keep serving meanwhile");
    is.push(inst(&new, "i-n1", 0, InstanceState::Running, 1));
    is.push(inst(&new, "i-n2", 1, InstanceState::Running, 1));
    let p = run(&new, &is, &["i-o1", "i-o2", "i-n1", "i-n2"]);
    let mut retired = p.retire.clone();
    retired.sort();
    assert_eq!(retired, vec!["i-o1", "i-o2"]);
    assert!(p.launch.is_empty());
}

#[test]
fn instances_of_another_uid_are_neither_adopted_nor_retired() {
    // Another object's instance under the same name (a predecessor, or another install's):
    // not counted, not served, and never retired by this object's plan.
    let b = bc(1, "t2.micro");
    let mut foreign = inst(&b, "i-prev", 0, InstanceState::Running, 10);
    foreign.owner_uid = "uid-0".into();
    let p = run(&b, &[foreign], &["i-prev"]);
    assert!(p.retire.is_empty(), "retired another object's instance");
    assert_eq!(p.launch.len(), 1);
    assert!(p.endpoints.is_empty());
    assert!(p.status.instances.is_empty());
}

#[test]
fn stopped_instances_are_replaced_and_retired() {
    let b = bc(2, "t2.micro");
    let p = run(
        &b,
        &[
            inst(&b, "i-a", 0, InstanceState::Running, 10),
            inst(&b, "i-stopped", 1, InstanceState::Stopped, 10),
            inst(&b, "i-stopping", 2, InstanceState::Stopping, 10),
        ],
        &["i-a"],
    );
    let mut retired = p.retire.clone();
    retired.sort();
    assert_eq!(retired, vec!["i-stopped", "i-stopping"]);
    assert_eq!(p.launch.len(), 1, "one replacement for the missing replica");
    assert_eq!(p.launch[0].slot, 1);
    assert_eq!(
        p.launch[0].attempt, 1,
        "the next attempt of the stopped slot"
    );
    assert_eq!(p.status.replicas, 1);
}

#[test]
fn the_scale_subresource_has_a_selector() {
    let b = bc(1, "t2.micro");
    let p = run(&b, &[], &[]);
    assert_eq!(
        p.status.selector.as_deref(),
        Some("fleetlb.dev/backendcluster=cluster1")
    );
}

#[test]
fn a_launch_intent_records_its_subnet_and_time() {
    let mut b = bc(2, "t2.micro");
    b.spec.provider = ProviderSpec::Aws(fleetlb_crds::AwsProvider {
        image_id: "ami-1".into(),
        subnet_ids: vec!["subnet-a".into(), "subnet-b".into(), "subnet-c".into()],
        ..Default::default()
    });
    let p = run(&b, &[], &[]);
    let subnets: Vec<_> = p
        .status
        .launches
        .iter()
        .map(|l| (l.slot, l.attempt, l.subnet_id.clone().unwrap()))
        .collect();
    assert_eq!(
        subnets,
        vec![(0, 0, "subnet-a".into()), (1, 0, "subnet-b".into())]
    );
    assert!(p.status.launches.iter().all(|l| l.recorded_at.is_some()));
    // The same intent planned again (a replay) names the same subnet.
    b.status = Some(p.status.clone());
    let again = run(&b, &[], &[]);
    assert_eq!(
        again.status.launches[1].subnet_id.as_deref(),
        Some("subnet-b")
    );
    assert_eq!(
        again.status.launches[1].client_token,
        p.status.launches[1].client_token
    );
}

#[test]
fn transition_time_moves_only_when_status_changes() {
    let mut conds = Vec::new();
    let t0 = Timestamp::UNIX_EPOCH;
    let t1 = t0 + Duration::from_secs(60);
    set_condition(&mut conds, "Ready", false, "Launching", "0/1", Some(1), t0);
    set_condition(
        &mut conds,
        "Ready",
        false,
        "HealthCheckFailing",
        "0/1",
        Some(1),
        t1,
    );
    assert_eq!(conds[0].last_transition_time.0, t0);
    assert_eq!(conds[0].reason, "HealthCheckFailing");
    set_condition(
        &mut conds,
        "Ready",
        true,
        "AllReplicasReady",
        "1/1",
        Some(1),
        t1,
    );
    assert_eq!(conds[0].last_transition_time.0, t1);
}

#[test]
fn instances_changed_behind_fleetlbs_back_are_replaced_surge_first() {
    use crate::provider::LaunchedAs;
    let mut b = bc(1, "t2.micro");
    b.spec.provider = ProviderSpec::Aws(fleetlb_crds::AwsProvider {
        image_id: "ami-1".into(),
        subnet_ids: vec!["subnet-a".into()],
        security_group_ids: vec!["sg-2".into(), "sg-1".into()],
        ..Default::default()
    });
    let as_launched = LaunchedAs {
        image_id: Some("ami-1".into()),
        subnet_id: Some("subnet-a".into()),
        security_groups: vec!["sg-1".into(), "sg-2".into()],
        zone: Some("us-east-1a".into()),
        spot: false,
    };
    let mut i = inst(&b, "i-1", 0, InstanceState::Running, 10);
    i.launched_as = Some(as_launched.clone());
    assert_eq!(i.drift(&b), None);
    let p = run(&b, std::slice::from_ref(&i), &["i-1"]);
    assert!(p.launch.is_empty() && p.retire.is_empty());

    // Someone swapped a security group in the console.
    i.launched_as = Some(LaunchedAs {
        security_groups: vec!["sg-1".into(), "sg-open".into()],
        ..as_launched.clone()
    });
    let why = i.drift(&b).unwrap();
    assert!(why.contains("sg-open"), "{why}");
    let p = run(&b, std::slice::from_ref(&i), &["i-1"]);
    assert_eq!(p.launch.len(), 1, "a replacement launches first");
    assert!(p.retire.is_empty(), "the drifted one serves until then");
    let progressing = condition(&p.status, "Progressing").unwrap();
    assert!(
        progressing.message.contains("sg-open"),
        "{}",
        progressing.message
    );

    // Once the replacement passes its checks, the drifted instance retires.
    let mut n = inst(&b, "i-2", 1, InstanceState::Running, 1);
    n.launched_as = Some(as_launched);
    let p = run(&b, &[i.clone(), n], &["i-1", "i-2"]);
    assert_eq!(p.retire, vec!["i-1"]);
}

#[test]
fn a_rollout_stays_within_its_surge_and_unavailability_budget() {
    let old = bc(4, "t2.micro");
    let new = bc(4, "t2.large"); // default budget: surge 25 % (1 of 4), unavailable 0
    let mut is: Vec<Instance> = (0..4)
        .map(|s| inst(&old, &format!("i-o{s}"), s, InstanceState::Running, 100))
        .collect();
    let mut healthy: Vec<String> = is.iter().map(|i| i.id.clone()).collect();
    let mut peak = 0;
    for step in 0..20 {
        let h: Vec<&str> = healthy.iter().map(String::as_str).collect();
        let p = run(&new, &is, &h);
        // Retire what the plan retires, launch what it launches (healthy at the next step).
        is.retain(|i| !p.retire.contains(&i.id));
        healthy.retain(|id| !p.retire.contains(id));
        let serving_healthy = is.iter().filter(|i| healthy.contains(&i.id)).count();
        assert!(
            serving_healthy >= 4,
            "step {step}: only {serving_healthy} healthy"
        );
        for (k, l) in p.launch.iter().enumerate() {
            let id = format!("i-n{step}-{k}");
            is.push(inst(&new, &id, l.slot, InstanceState::Running, 0));
            healthy.push(id);
        }
        peak = peak.max(is.len());
        if is.iter().all(|i| i.instance_type == "t2.large") && is.len() == 4 {
            assert!(peak <= 5, "surged to {peak}");
            return;
        }
    }
    panic!(
        "rollout did not finish: {:?}",
        is.iter().map(|i| &i.id).collect::<Vec<_>>()
    );
}

#[test]
fn a_controller_that_knows_no_health_yet_retires_no_drifted_instance() {
    let old = bc(2, "t2.micro");
    let new = bc(2, "t2.large");
    let is = vec![
        inst(&old, "i-o1", 0, InstanceState::Running, 10),
        inst(&old, "i-o2", 1, InstanceState::Running, 10),
        inst(&new, "i-n1", 0, InstanceState::Running, 1),
    ];
    let p = run(&new, &is, &[]);
    assert!(p.retire.is_empty(), "{:?}", p.retire);
}

#[test]
fn an_autoscaled_cluster_follows_the_autoscaler_within_its_bounds_and_the_replicas_floor() {
    let mut b = bc(2, "t2.micro");
    b.spec.autoscaling = Some(fleetlb_crds::Autoscaling {
        min_replicas: 1,
        max_replicas: 6,
        target_inflight_per_instance: 8,
        target_requests_per_second_per_instance: None,
        stable_window_seconds: 60,
        scale_down_delay_seconds: 60,
        max_scale_up_rate: 10,
    });
    // No decision yet: the floor, max(minReplicas, replicas).
    assert_eq!(desired_replicas(&b), 2);
    let mut with = |n: u32| {
        b.status.get_or_insert_with(Default::default).autoscaling =
            Some(fleetlb_crds::AutoscalingStatus {
                desired_replicas: n,
                ..Default::default()
            });
        desired_replicas(&b)
    };
    assert_eq!(with(5), 5);
    assert_eq!(with(60), 6, "maxReplicas caps");
    assert_eq!(with(1), 2, "kubectl scale (replicas) is a floor");
    b.spec.replicas = 0;
    b.status
        .as_mut()
        .unwrap()
        .autoscaling
        .as_mut()
        .unwrap()
        .desired_replicas = 0;
    assert_eq!(desired_replicas(&b), 1, "minReplicas is the floor");
}

#[test]
fn grpc_replaces_local_instances_only() {
    // A local instance serves gRPC only when launched with --grpc: switching replaces it. An
    // EC2 instance's software is its image's, and HTTP1 keeps the hashes written before
    // `spec.protocol` existed: neither is replaced.
    let plain = bc(2, "t2.micro");
    let mut grpc = plain.clone();
    grpc.spec.protocol = fleetlb_crds::Protocol::Grpc;
    assert_ne!(spec_hash(&plain), spec_hash(&grpc));
    let mut http2 = plain.clone();
    http2.spec.protocol = fleetlb_crds::Protocol::Http2;
    assert_eq!(spec_hash(&plain), spec_hash(&http2));
    let aws: ProviderSpec = serde_json::from_value(serde_json::json!({
        "aws": {"imageId": "ami-0123456789abcdef0"}
    }))
    .unwrap();
    let (mut a, mut b) = (plain.clone(), grpc.clone());
    a.spec.provider = aws.clone();
    b.spec.provider = aws;
    assert_eq!(spec_hash(&a), spec_hash(&b));
    let launch = run(&grpc, &[], &[]).launch;
    assert_eq!(launch.len(), 2);
    assert!(
        launch.iter().all(|l| l.grpc),
        "local launches ask for --grpc"
    );
    assert!(run(&plain, &[], &[]).launch.iter().all(|l| !l.grpc));
}

#[test]
fn several_types_start_each_launch_at_the_preferred_one_and_keep_their_instances() {
    let mut b = bc(1, "t3.small");
    b.spec.instance_type = None;
    b.spec.instance_types = vec!["t3.small".into(), "t3.medium".into()];
    let first = &run(&b, &[], &[]).launch[0];
    assert_eq!(
        (first.attempt, first.instance_type.as_str()),
        (0, "t3.small")
    );
    // Slot 0 had an instance (attempt 0) that is gone: the relaunch is the preferred type
    // again, one subnet on (attempt 2 = type 0 of the next subnet), not the fallback.
    let mut gone = inst(&b, "i-gone", 0, InstanceState::Terminated, 10);
    gone.instance_type = "t3.small".into();
    let again = &run(&b, &[gone], &[]).launch[0];
    assert_eq!(
        (again.attempt, again.instance_type.as_str()),
        (2, "t3.small")
    );
    assert_eq!(again.zone_attempt(), 1);
    // The fallback type's instance is kept, and editing the list replaces nobody.
    let mut fallback = inst(&b, "i-1", 0, InstanceState::Running, 10);
    fallback.instance_type = "t3.medium".into();
    assert_eq!(fallback.drift(&b), None);
    b.spec.instance_types.push("t3a.small".into());
    assert_eq!(fallback.drift(&b), None, "adding a type is no drift");
    b.spec.instance_types = vec!["t3.small".into(), "t3a.small".into()];
    assert!(fallback.drift(&b).is_some(), "its type is no longer listed");
    // One type in a list hashes as the shorthand.
    let mut one = bc(1, "t3.small");
    let short = spec_hash(&one);
    one.spec.instance_type = None;
    one.spec.instance_types = vec!["t3.small".into()];
    assert_eq!(spec_hash(&one), short);
}

#[test]
fn an_interrupted_instance_leaves_the_endpoints_at_once_and_is_replaced() {
    let b = bc(3, "t2.micro");
    let is = [
        inst(&b, "i-a", 0, InstanceState::Running, 10),
        inst(&b, "i-b", 1, InstanceState::Running, 10),
        inst(&b, "i-c", 2, InstanceState::Running, 10),
    ];
    let healthy = ["i-a", "i-b", "i-c"];
    let notices = HashMap::from([(
        "i-b".to_string(),
        crate::interruption::Kind::SpotInterruption,
    )]);
    let p = run_interrupted(&b, &is, &healthy, &notices);
    assert_eq!(p.retire, ["i-b"], "retired at once, not after a surge");
    let ids: Vec<&str> = p.endpoints.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), 2);
    assert!(!ids.contains(&"i-b"), "{ids:?}");
    assert_eq!(p.launch.len(), 1, "its replacement, in the same pass");
    assert_eq!((p.launch[0].slot, p.launch[0].attempt), (1, 1));
    let b_status = p.status.instances.iter().find(|i| i.id == "i-b").unwrap();
    assert_eq!(b_status.state, "draining");
    assert_eq!(p.status.replicas, 2);
    // Without the notice nothing happens.
    let p = run(&b, &is, &healthy);
    assert!(p.retire.is_empty() && p.launch.is_empty());
}

#[test]
fn a_replacement_goes_back_to_its_slots_subnet() {
    let b = aws3(3);
    let subnets: Vec<String> = ["subnet-a", "subnet-b", "subnet-c"]
        .map(String::from)
        .into();
    // Slot 1 (subnet-b) had an instance at attempt 0, and one at attempt 1 that a shortage in
    // subnet-b had sent to subnet-c; both are gone. The replacement is in subnet-b again.
    for attempt in [0, 1] {
        let mut gone = inst(&b, "i-gone", 1, InstanceState::Terminated, 10);
        gone.attempt = attempt;
        let is = [
            inst(&b, "i-a", 0, InstanceState::Running, 10),
            gone,
            inst(&b, "i-c", 2, InstanceState::Running, 10),
        ];
        let p = run(&b, &is, &["i-a", "i-c"]);
        assert_eq!(p.launch.len(), 1);
        let l = &p.launch[0];
        assert_eq!(l.attempt, 3, "the next attempt in the slot's own subnet");
        assert_eq!(
            crate::provider::subnet_for(&subnets, l.slot, l.zone_attempt()),
            Some("subnet-b")
        );
    }
}

#[test]
fn a_rebalance_recommendation_replaces_the_instance_before_it_leaves() {
    let b = bc(1, "t2.micro");
    let old = inst(&b, "i-old", 0, InstanceState::Running, 100);
    let notices = HashMap::from([(
        "i-old".to_string(),
        crate::interruption::Kind::RebalanceRecommendation,
    )]);
    // The only instance: it keeps serving while its replacement launches.
    let p = run_interrupted(&b, std::slice::from_ref(&old), &["i-old"], &notices);
    assert!(p.retire.is_empty(), "{:?}", p.retire);
    assert_eq!(p.endpoints.len(), 1);
    assert_eq!(p.launch.len(), 1);
    // Its replacement healthy: now it goes.
    let new = inst(&b, "i-new", 1, InstanceState::Running, 1);
    let p = run_interrupted(&b, &[old, new], &["i-old", "i-new"], &notices);
    assert_eq!(p.retire, ["i-old"]);
    assert!(p.launch.is_empty());
    // Four replicas, where maxUnavailable would let one go at once: it still waits for its
    // replacement (the notice may come days ahead).
    let b = bc(4, "t2.micro");
    let is: Vec<Instance> = (0..4)
        .map(|s| inst(&b, &format!("i-{s}"), s, InstanceState::Running, 100))
        .collect();
    let notices = HashMap::from([(
        "i-0".to_string(),
        crate::interruption::Kind::ScheduledChange,
    )]);
    let p = run_interrupted(&b, &is, &["i-0", "i-1", "i-2", "i-3"], &notices);
    assert!(p.retire.is_empty(), "{:?}", p.retire);
    assert_eq!(p.launch.len(), 1);
}

#[test]
fn a_recorded_intent_is_repeated_as_it_was_whatever_the_rounding() {
    // Slot 0's instance (attempt 0) is gone, and attempt 1 (a capacity fallback) was recorded
    // and perhaps sent before a crash: the replay is attempt 1, not a fresh round.
    let b = with_intent(aws3(1), 1, "subnet-b", None);
    let gone = inst(&b, "i-gone", 0, InstanceState::Terminated, 10);
    let p = run(&b, &[gone], &[]);
    assert_eq!(p.launch.len(), 1);
    assert_eq!(p.launch[0].attempt, 1);
}

#[test]
fn a_fulfilled_intent_is_not_repeated_once_its_instance_left_the_listing() {
    // Slot 0's launch made i-old, terminated by a scale-down more than an hour ago: EC2 no
    // longer lists it. Repeating its token would get i-old back (EC2 answers a repeated token
    // with the instance it made), not a new instance.
    let mut b = with_intent(aws3(1), 0, "subnet-a", Some("i-old"));
    let p = run(&b, &[], &[]);
    assert_eq!(p.launch.len(), 1);
    // A new attempt, starting again at the preferred type in the slot's own subnet.
    assert_eq!(p.launch[0].attempt, 3);
    assert!(!p.launch[0].replay);
    // Answered just now, its instance not listed yet (EC2's listing lags): the same token
    // again, which gets the same instance back rather than a second one.
    b.status.as_mut().unwrap().launches[0].recorded_at = Some(Time(Timestamp::UNIX_EPOCH));
    let p = run(&b, &[], &[]);
    assert_eq!(p.launch.len(), 1);
    assert_eq!(p.launch[0].attempt, 0);
    assert!(p.launch[0].replay);
}

#[test]
fn the_arm64_image_replaces_only_arm64_instances() {
    let aws = |arm: Option<&str>| {
        let mut b = bc(2, "t3.small");
        b.spec.instance_type = None;
        b.spec.instance_types = vec!["t4g.small".into(), "t3.small".into()];
        b.spec.provider = ProviderSpec::Aws(fleetlb_crds::AwsProvider {
            image_id: "ami-00000001".into(),
            arm64_image_id: arm.map(String::from),
            ..Default::default()
        });
        b
    };
    let (one, two) = (aws(Some("ami-0000000a")), aws(Some("ami-0000000b")));
    // Out of the hash: setting or changing it replaces nothing by itself...
    assert_eq!(spec_hash(&aws(None)), spec_hash(&one));
    assert_eq!(spec_hash(&one), spec_hash(&two));
    // ... each instance is checked against its own type's image.
    let launched = |b: &BackendCluster, id: &str, t: &str| {
        let mut i = inst(b, id, 0, InstanceState::Running, 10);
        i.instance_type = t.into();
        i.launched_as = Some(crate::provider::LaunchedAs {
            image_id: Some(
                match &b.spec.provider {
                    ProviderSpec::Aws(a) => a.image_for(t),
                    _ => unreachable!(),
                }
                .to_string(),
            ),
            ..Default::default()
        });
        i
    };
    let arm = launched(&one, "i-arm", "t4g.small");
    let x86 = launched(&one, "i-x86", "t3.small");
    assert_eq!(arm.drift(&one), None);
    assert_eq!(x86.drift(&one), None);
    assert!(arm.drift(&two).is_some_and(|d| d.contains("ami-0000000a")));
    assert_eq!(x86.drift(&two), None, "the x86_64 instance keeps serving");
    // The token names the attempt's image: a replay after an edit is a new launch.
    let p1 = run(&one, &[], &[]);
    let p2 = run(&two, &[], &[]);
    assert_eq!(p1.launch[0].instance_type, "t4g.small");
    assert_ne!(p1.launch[0].token(), p2.launch[0].token());
}

#[test]
fn a_token_names_the_market_and_subnet_its_attempt_maps_to() {
    let mut b = bc(1, "t3.small");
    b.spec.provider = serde_json::from_value(serde_json::json!({
        "aws": {"imageId": "ami-0123456789abcdef0", "subnetIds": ["subnet-a", "subnet-b"]}
    }))
    .unwrap();
    b.spec.capacity_type = fleetlb_crds::CapacityType::SpotThenOnDemand;
    let mut r = run(&b, &[], &[]).launch.remove(0);
    assert!(r.spot());
    let spot_a = r.token();
    // Attempt 1: on-demand, same subnet, its own token.
    r.set_attempt(1);
    assert!(!r.spot());
    assert_eq!(r.zone_attempt(), 0);
    assert_ne!(r.token(), spot_a);
    // An edit of capacityType maps attempt 0 to another market: another token, never the
    // same token with other parameters.
    b.spec.capacity_type = fleetlb_crds::CapacityType::OnDemand;
    let on_demand = run(&b, &[], &[]).launch.remove(0);
    assert_eq!((on_demand.attempt, on_demand.spot()), (0, false));
    assert_ne!(on_demand.token(), spot_a);
    b.spec.capacity_type = fleetlb_crds::CapacityType::Spot;
    let spot = run(&b, &[], &[]).launch.remove(0);
    assert_ne!(spot.token(), on_demand.token());
}
