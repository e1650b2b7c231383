//! The Kubernetes driver against a scripted API server (the `ApiServerVerifier` pattern of
//! kube-rs/controller-rs: a tower-test mock service answers each request the driver makes and
//! the test asserts on it) and a real `moto_server` for EC2. No kube-apiserver runs on these
//! machines; `needs_a_cluster` at the end is the end-to-end test for a real one.

use std::sync::Arc;
use std::time::Duration;

use fleetlb_controller::Providers;
use fleetlb_controller::core::Core;
use fleetlb_controller::kubernetes::{self, Context, FINALIZER, KubeConfig, Watched, Wiring};
use fleetlb_controller::lease::{Elector, LeaseConfig};
use fleetlb_controller::metrics::Metrics;
use fleetlb_controller::provider::aws::AwsProvider;
use fleetlb_crds::BackendCluster;
use fleetlb_dataplane::{Dataplane, ProxyConfig, RouteTable};
use http::{Method, Request, Response};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use kube::runtime::{reflector, watcher};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::watch;
use tower_test::mock::{self, Handle, SendResponse};

mod support;
use support::{Env, env};

const DEADLINE: Duration = Duration::from_secs(30);

/// The scripted API server.
/// The scripted API server. A read of one BackendCluster (the controller reads a generation it
/// has not acted on from the API server before acting) is answered from `objects` without
/// involving the test.
struct ApiServer(
    Handle<Request<Body>, Response<Body>>,
    std::collections::BTreeMap<String, Value>,
);

struct Call {
    method: Method,
    uri: String,
    body: Value,
    reply: SendResponse<Response<Body>>,
}

impl ApiServer {
    /// The next request, however long it takes (paused-time tests).
    async fn next_unbounded(&mut self) -> SendResponse<Response<Body>> {
        let (_req, reply) = self.0.next_request().await.expect("the client is alive");
        reply
    }

    /// The next request the driver makes.
    async fn next(&mut self) -> Call {
        let (req, reply) = loop {
            let (req, reply) = tokio::time::timeout(DEADLINE, self.0.next_request())
                .await
                .expect("the driver made the expected API call")
                .expect("the client is alive");
            let path = req.uri().path();
            let read = (req.method() == Method::GET)
                .then(|| {
                    path.strip_prefix(
                        "/apis/fleetlb.dev/v1alpha1/namespaces/default/backendclusters/",
                    )
                })
                .flatten()
                .and_then(|name| self.1.get(name));
            match read {
                Some(object) => reply.send_response(
                    Response::builder()
                        .body(Body::from(serde_json::to_vec(object).unwrap()))
                        .unwrap(),
                ),
                None => break (req, reply),
            }
        };
        let method = req.method().clone();
        let uri = req.uri().to_string();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        Call {
            method,
            uri,
            body,
            reply,
        }
    }

    /// The next request, which must be a status write of BackendCluster `name`.
    async fn next_status_of(&mut self, name: &str) -> Call {
        let call = self.next().await;
        assert!(
            call.uri
                .contains(&format!("/backendclusters/{name}/status?")),
            "{}",
            call.uri
        );
        call
    }
}

impl Call {
    fn ok(self, body: &Value) {
        self.reply.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(body).unwrap()))
                .unwrap(),
        );
    }

    fn status(self, code: u16, reason: &str) {
        let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": reason, "reason": reason, "code": code});
        self.reply.send_response(
            Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
    }

    /// An event POST; answers it as created and returns (type, reason, note).
    fn event(self) -> (String, String, String) {
        // A repeat of an earlier event is a PATCH of that event's series.
        assert!(
            self.method == Method::POST || self.method == Method::PATCH,
            "{}",
            self.uri
        );
        assert!(
            self.uri
                .starts_with("/apis/events.k8s.io/v1/namespaces/default/events"),
            "{}",
            self.uri
        );
        let s = |k: &str| self.body[k].as_str().unwrap_or("").to_string();
        let out = (s("type"), s("reason"), s("note"));
        let body = self.body.clone();
        self.ok(&body);
        out
    }
}

fn object(env: &Env, replicas: u32, finalized: bool) -> BackendCluster {
    let mut o: BackendCluster = serde_json::from_value(json!({
        "apiVersion": "fleetlb.dev/v1alpha1",
        "kind": "BackendCluster",
        "metadata": {
            "name": "web", "namespace": "default", "uid": "uid-web", "generation": 1,
            "resourceVersion": "10", "creationTimestamp": "2026-11-28T00:00:00Z",
        },
        "spec": {
            "route": "/web", "replicas": replicas, "instanceType": "t2.micro", "port": 8000,
            "provider": {"aws": {"imageId": env.image, "subnetIds": env.subnets}},
        },
    }))
    .unwrap();
    if finalized {
        o.metadata.finalizers = Some(vec![FINALIZER.into()]);
    }
    o
}

struct Harness {
    ctx: Arc<Context>,
    api: ApiServer,
    registry: prometheus::Registry,
    routes: watch::Receiver<RouteTable>,
    _leader: watch::Sender<bool>,
    _status: watch::Receiver<bytes::Bytes>,
}

fn harness(env: &Env, leader: bool, objects: &[&BackendCluster]) -> Harness {
    harness_with(env, leader, objects, KubeConfig::default())
}

fn harness_with(env: &Env, leader: bool, objects: &[&BackendCluster], cfg: KubeConfig) -> Harness {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(&registry).unwrap();
    let dataplane = Dataplane::new(ProxyConfig::default(), &registry).unwrap();
    let providers = Providers {
        aws: Some(Arc::new(AwsProvider::new(
            &env.conf,
            "ctl-kube".into(),
            metrics.clone(),
        ))),
        ..Providers::default()
    };
    let (store, mut writer) = reflector::store();
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::Apply(Watched::from((*o).clone())));
    }
    let (leader_tx, leader_rx) = watch::channel(leader);
    let (routes_tx, routes) = watch::channel(RouteTable::default());
    let (status_tx, status_rx) = watch::channel(bytes::Bytes::new());
    let core = Core::new(providers, dataplane, metrics, cfg.core.clone());
    let wiring = Wiring {
        client,
        reporter: Reporter {
            controller: "fleetlb".into(),
            instance: Some("replica-a".into()),
        },
        leader: leader_rx,
        term: fleetlb_controller::lease::Term::unbounded(),
        routes: routes_tx,
        status: status_tx,
    };
    let ctx = Context::new(wiring, core, store, cfg);
    Harness {
        ctx: Arc::new(ctx),
        api: ApiServer(
            handle,
            objects
                .iter()
                .map(|o| {
                    (
                        o.metadata.name.clone().unwrap_or_default(),
                        serde_json::to_value(o).unwrap(),
                    )
                })
                .collect(),
        ),
        registry,
        routes,
        _leader: leader_tx,
        _status: status_rx,
    }
}

fn ec2_calls(registry: &prometheus::Registry) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "fleetlb_controller_ec2_requests_total")
        .flat_map(|f| f.get_metric())
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

async fn live_instances(env: &Env) -> Vec<String> {
    support::live(&env.ec2, "ctl-kube", None)
        .await
        .iter()
        .filter_map(|i| i.instance_id().map(String::from))
        .collect()
}

async fn client_tokens(env: &Env) -> Vec<String> {
    let out = env.ec2.describe_instances().send().await.unwrap();
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.client_token().map(String::from))
        .collect()
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("condition {type_} in {status}"))
}

async fn finish(
    t: tokio::task::JoinHandle<Result<Action, kubernetes::Error>>,
) -> Result<Action, kubernetes::Error> {
    tokio::time::timeout(DEADLINE, t)
        .await
        .expect("reconcile finished")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_finalizer_goes_on_before_any_ec2_call() {
    let env = env().await;
    let obj = object(&env, 2, false);
    let mut h = harness(&env, true, &[&obj]);
    let t = tokio::spawn(kubernetes::reconcile(
        Arc::new(Watched::from(obj.clone())),
        h.ctx.clone(),
    ));
    let call = h.api.next().await;
    assert_eq!(call.method, Method::PATCH);
    assert!(
        call.uri
            .starts_with("/apis/fleetlb.dev/v1alpha1/namespaces/default/backendclusters/web?"),
        "{}",
        call.uri
    );
    assert_eq!(
        call.body,
        json!([{"op": "test", "path": "/metadata/finalizers", "value": null},
               {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}])
    );
    let mut done = obj.clone();
    done.metadata.finalizers = Some(vec![FINALIZER.into()]);
    call.ok(&serde_json::to_value(&done).unwrap());
    assert_eq!(finish(t).await.unwrap(), Action::await_change());
    assert_eq!(ec2_calls(&h.registry), 0);
    assert!(live_instances(&env).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_records_intents_launches_writes_status_by_apply_and_records_events() {
    let env = env().await;
    let mut obj = object(&env, 2, true);
    // A previous leader recorded slot 1's launch (attempt 3) and died before RunInstances
    // returned: the intent is repeated with the same token.
    let hash = fleetlb_controller::provider::spec_hash(&obj);
    let token = fleetlb_controller::provider::scoped_token("ctl-kube", "uid-web", 1, &hash, 3);
    obj.status = serde_json::from_value(
        json!({"launches": [{"slot": 1, "attempt": 3, "clientToken": token}]}),
    )
    .unwrap();
    let mut h = harness(&env, true, &[&obj]);
    let t = tokio::spawn(kubernetes::reconcile(
        Arc::new(Watched::from(obj.clone())),
        h.ctx.clone(),
    ));

    let call = h.api.next().await;
    assert_eq!(call.method, Method::PATCH);
    assert!(
        call.uri.starts_with(
            "/apis/fleetlb.dev/v1alpha1/namespaces/default/backendclusters/web/status?"
        ) && call.uri.contains("fieldManager=fleetlb")
            && call.uri.contains("force=true"),
        "{}",
        call.uri
    );
    assert_eq!(call.body["apiVersion"], "fleetlb.dev/v1alpha1");
    let status = call.body["status"].clone();
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(condition(&status, "Ready")["status"], "False");
    assert_eq!(condition(&status, "Ready")["reason"], "Launching");
    assert_eq!(condition(&status, "Progressing")["status"], "True");
    let replay = &status["launches"][1];
    assert_eq!(
        (&replay["slot"], &replay["attempt"], &replay["clientToken"]),
        (&json!(1), &json!(3), &json!(token))
    );
    // The subnet is a function of (slot, attempt): the replay carries the one the first try did.
    assert_eq!(
        replay["subnetId"],
        json!(env.subnets[(1 + 3) % env.subnets.len()])
    );
    assert!(replay["recordedAt"].is_string());
    assert_eq!(status["launches"][0]["slot"], 0);
    assert_eq!(
        ec2_calls(&h.registry),
        1,
        "intents are written before RunInstances"
    );
    let mut with_status = obj.clone();
    with_status.status = serde_json::from_value(status).ok();
    call.ok(&serde_json::to_value(&with_status).unwrap());
    // After the launches: the status with the instance each intent made.
    let call = h.api.next_status_of("web").await;
    let status = call.body["status"].clone();
    for l in status["launches"].as_array().unwrap() {
        assert!(
            l["instanceId"]
                .as_str()
                .is_some_and(|i| i.starts_with("i-")),
            "{l}"
        );
    }
    with_status.status = serde_json::from_value(status).ok();
    call.ok(&serde_json::to_value(&with_status).unwrap());

    let (type_, reason, note) = h.api.next().await.event();
    assert_eq!((type_.as_str(), reason.as_str()), ("Normal", "Launched"));
    assert!(note.starts_with("launched 2 t2.micro: i-"), "{note}");
    let action = finish(t).await.unwrap();
    assert_eq!(action, Action::requeue(KubeConfig::default().busy));
    let ids = live_instances(&env).await;
    assert_eq!(ids.len(), 2);
    let tokens = client_tokens(&env).await;
    assert!(tokens.contains(&token), "{tokens:?}");

    // The next reconcile sees both instances, launches nothing more and reports them.
    let t = tokio::spawn(kubernetes::reconcile(
        Arc::new(Watched::from(with_status.clone())),
        h.ctx.clone(),
    ));
    let call = h.api.next_status_of("web").await;
    let status = call.body["status"].clone();
    assert_eq!(status["replicas"], 2);
    let mut reported: Vec<String> = status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    reported.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(reported, expected);
    call.ok(&json!(with_status));
    finish(t).await.unwrap();
    assert_eq!(live_instances(&env).await.len(), 2, "no duplicate launch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_terminates_every_instance_before_releasing_the_finalizer() {
    let env = env().await;
    let obj = object(&env, 2, true);
    let mut h = harness(&env, true, &[&obj]);
    let t = tokio::spawn(kubernetes::reconcile(
        Arc::new(Watched::from(obj.clone())),
        h.ctx.clone(),
    ));
    // Intents, then the instances they made, then the Event.
    h.api.next().await.ok(&json!(obj));
    h.api.next().await.ok(&json!(obj));
    h.api.next().await.event();
    finish(t).await.unwrap();
    assert_eq!(live_instances(&env).await.len(), 2);

    let mut deleting = obj.clone();
    deleting.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-11-28T00:01:00Z".parse().unwrap(),
        ));
    let deleting = Arc::new(Watched::from(deleting));
    // Until EC2 shows every instance terminated, the finalizer stays (the only API calls are
    // status writes saying what deletion waits for).
    let mut released = false;
    let mut waiting_for = Vec::new();
    'passes: for _ in 0..20 {
        let mut t = tokio::spawn(kubernetes::reconcile(deleting.clone(), h.ctx.clone()));
        let r = loop {
            tokio::select! {
                r = &mut t => break r.unwrap(),
                call = h.api.next() => {
                    if call.uri.contains("/status") {
                        let c = condition(&call.body["status"], "Ready");
                        assert_eq!(c["reason"], "Deleting");
                        waiting_for.push(c["message"].as_str().unwrap().to_string());
                        call.ok(&json!(obj));
                        continue;
                    }
                    let (type_, reason, note) = call.event();
                    assert_eq!((type_.as_str(), reason.as_str()), ("Normal", "Deleted"));
                    assert_eq!(note, "every instance terminated; deletion complete");
                    assert!(live_instances(&env).await.is_empty(), "finalizer released while instances live");
                    let call = h.api.next().await;
                    assert_eq!(call.method, Method::PATCH);
                    assert_eq!(
                        call.body,
                        json!([{"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
                               {"op": "remove", "path": "/metadata/finalizers/0"}])
                    );
                    call.ok(&json!(obj));
                    released = true;
                    break 'passes;
                }
            }
        };
        assert!(
            matches!(r, Err(ref e) if e.to_string().contains("terminate")),
            "{r:?}"
        );
    }
    assert!(
        waiting_for.iter().all(|m| m.contains("terminate")),
        "{waiting_for:?}"
    );
    assert!(released, "finalizer released once instances are gone");
    assert!(live_instances(&env).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_the_lease_serves_from_status_and_never_calls_ec2() {
    let env = env().await;
    let mut obj = object(&env, 2, true);
    obj.status = serde_json::from_value(json!({
        "replicas": 2, "readyReplicas": 2,
        "endpoints": [{"id": "i-a", "address": "10.0.0.1:8000"}, {"id": "i-b", "address": "10.0.0.2:8000"}],
    }))
    .unwrap();
    let mut h = harness(&env, false, &[&obj]);
    // The scripted API server never answers: any API call would stall this past the deadline.
    let t = tokio::spawn(kubernetes::reconcile(
        Arc::new(Watched::from(obj.clone())),
        h.ctx.clone(),
    ));
    assert_eq!(
        finish(t).await.unwrap(),
        Action::requeue(KubeConfig::default().resync)
    );
    assert_eq!(ec2_calls(&h.registry), 0);
    // What the route publisher of `run` does after a reconcile.
    h.ctx.publish_routes();
    let table = h.routes.borrow().clone();
    assert_eq!(table.routes.len(), 1);
    assert_eq!(table.routes[0].prefix, "/web");
    let ids: Vec<&str> = table.routes[0]
        .endpoints
        .iter()
        .map(|e| e.id.as_str())
        .collect();
    assert_eq!(ids, ["i-a", "i-b"]);
    // `/status` (what `fleetlb status` prints) comes from the same objects.
    h.ctx.publish_status();
    let view: Value = serde_json::from_slice(&h._status.borrow_and_update()).unwrap();
    let c = &view["clusters"][0];
    assert_eq!(
        (
            c["name"].as_str(),
            c["route"].as_str(),
            c["provider"].as_str()
        ),
        (Some("web"), Some("/web"), Some("aws"))
    );
    assert_eq!(c["status"]["readyReplicas"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_the_schema_cannot_reject_gets_invalid_spec_and_no_ec2_call() {
    let env = env().await;
    let mut obj = object(&env, 2, false);
    obj.spec.health_check.interval_seconds = 5;
    obj.spec.health_check.timeout_seconds = 10;
    let mut h = harness(&env, true, &[&obj]);
    let t = tokio::spawn(kubernetes::reconcile(
        Arc::new(Watched::from(obj.clone())),
        h.ctx.clone(),
    ));
    let (type_, reason, note) = h.api.next().await.event();
    assert_eq!(
        (type_.as_str(), reason.as_str()),
        ("Warning", "InvalidSpec")
    );
    assert!(note.contains("spec.healthCheck.timeoutSeconds"), "{note}");
    let call = h.api.next_status_of("web").await;
    let ready = condition(&call.body["status"], "Ready").clone();
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "InvalidSpec");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("spec.healthCheck.timeoutSeconds"),
        "{ready}"
    );
    call.ok(&json!(obj));
    finish(t).await.unwrap();
    assert_eq!(ec2_calls(&h.registry), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_younger_of_two_objects_claiming_one_route_is_refused() {
    let env = env().await;
    let old = object(&env, 1, true);
    let mut young = object(&env, 1, true);
    young.metadata.name = Some("web2".into());
    young.metadata.uid = Some("uid-web2".into());
    young.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-11-28T00:05:00Z".parse().unwrap(),
    ));
    let mut h = harness(&env, true, &[&old, &young]);
    let t = tokio::spawn(kubernetes::reconcile(
        Arc::new(Watched::from(young.clone())),
        h.ctx.clone(),
    ));
    let (_, reason, note) = h.api.next().await.event();
    assert_eq!(reason, "RouteConflict");
    assert!(
        note.contains("spec.route: /web is already served by web"),
        "{note}"
    );
    let call = h.api.next_status_of("web2").await;
    call.ok(&json!(young));
    finish(t).await.unwrap();
    assert_eq!(ec2_calls(&h.registry), 0);
    h.ctx.publish_routes();
    let table = h.routes.borrow().clone();
    assert_eq!(table.routes.len(), 1);
    assert_eq!(table.routes[0].cluster, "web");
}

// ---- leader election -------------------------------------------------------------------

fn lease(holder: &str, rv: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "fleetlb-leader", "namespace": "fleetlb-system", "resourceVersion": rv},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "leaseTransitions": 3},
    })
}

fn elector(identity: &str) -> (Elector, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let cfg = LeaseConfig::new(
        "fleetlb-system".into(),
        "fleetlb-leader".into(),
        identity.into(),
    );
    (
        Elector::new(Api::namespaced(client, "fleetlb-system"), cfg),
        ApiServer(handle, Default::default()),
    )
}

const LEASE_URI: &str = "/apis/coordination.k8s.io/v1/namespaces/fleetlb-system/leases";

async fn step(e: &mut Elector, api: &mut ApiServer, answer: impl FnOnce(Call)) -> bool {
    let (leads, ()) = tokio::join!(e.step(), async {
        let call = api.next().await;
        assert_eq!(call.method, Method::GET);
        assert!(
            call.uri.starts_with(&format!("{LEASE_URI}/fleetlb-leader")),
            "{}",
            call.uri
        );
        answer(call);
    });
    leads
}

#[tokio::test(start_paused = true)]
async fn the_first_replica_creates_the_lease_and_leads() {
    let (mut e, mut api) = elector("replica-a");
    let (leads, ()) = tokio::join!(e.step(), async {
        api.next().await.status(404, "NotFound");
        let call = api.next().await;
        assert_eq!(call.method, Method::POST);
        assert!(call.uri.starts_with(LEASE_URI), "{}", call.uri);
        assert_eq!(call.body["spec"]["holderIdentity"], "replica-a");
        let body = call.body.clone();
        call.ok(&body);
    });
    assert!(leads);
}

#[tokio::test(start_paused = true)]
async fn a_second_replica_waits_out_the_lease_and_takes_over_only_when_it_stops_changing() {
    let (mut e, mut api) = elector("replica-b");
    // Held and renewed by replica-a: never taken, however long it runs.
    assert!(!step(&mut e, &mut api, |c| c.ok(&lease("replica-a", "5"))).await);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(!step(&mut e, &mut api, |c| c.ok(&lease("replica-a", "6"))).await);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(!step(&mut e, &mut api, |c| c.ok(&lease("replica-a", "7"))).await);
    // replica-a stops renewing: the same record for longer than 15 s.
    tokio::time::advance(Duration::from_secs(14)).await;
    assert!(!step(&mut e, &mut api, |c| c.ok(&lease("replica-a", "7"))).await);
    tokio::time::advance(Duration::from_secs(2)).await;
    let (leads, ()) = tokio::join!(e.step(), async {
        api.next().await.ok(&lease("replica-a", "7"));
        let call = api.next().await;
        assert_eq!(call.method, Method::PUT);
        assert_eq!(call.body["metadata"]["resourceVersion"], "7");
        assert_eq!(call.body["spec"]["holderIdentity"], "replica-b");
        assert_eq!(call.body["spec"]["leaseTransitions"], 4);
        let body = call.body.clone();
        call.ok(&body);
    });
    assert!(leads);
}

#[tokio::test(start_paused = true)]
async fn losing_the_race_for_an_expired_lease_means_not_leading() {
    let (mut e, mut api) = elector("replica-b");
    assert!(!step(&mut e, &mut api, |c| c.ok(&lease("replica-a", "7"))).await);
    tokio::time::advance(Duration::from_secs(16)).await;
    let (leads, ()) = tokio::join!(e.step(), async {
        api.next().await.ok(&lease("replica-a", "7"));
        // replica-c wrote first: the API server refuses the stale resourceVersion.
        api.next().await.status(409, "Conflict");
    });
    assert!(!leads);
}

#[tokio::test(start_paused = true)]
async fn a_leader_cut_off_from_the_api_server_stops_acting_before_its_lease_expires() {
    let (mut e, mut api) = elector("replica-a");
    let (leads, ()) = tokio::join!(e.step(), async {
        api.next().await.ok(&lease("replica-a", "1"));
        let call = api.next().await;
        assert_eq!(call.method, Method::PUT);
        let body = call.body.clone();
        call.ok(&body);
    });
    assert!(leads);
    let unreachable = |c: Call| {
        c.reply.send_error(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "down",
        ))
    };
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(
        step(&mut e, &mut api, unreachable).await,
        "renewed 5 s ago: still leads"
    );
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!(
        !e.step().await,
        "no renewal for 11 s (deadline 10 s, lease 15 s): stops acting, without even asking"
    );
}

#[tokio::test(start_paused = true)]
async fn a_leader_shutting_down_gives_the_lease_up() {
    let (mut e, mut api) = elector("replica-a");
    let (leads, ()) = tokio::join!(e.step(), async {
        api.next().await.ok(&lease("replica-a", "1"));
        let renewal = api.next().await;
        let body = renewal.body.clone();
        renewal.ok(&body);
    });
    assert!(leads);
    let ((), ()) = tokio::join!(e.release(), async {
        api.next().await.ok(&lease("replica-a", "2"));
        let call = api.next().await;
        assert_eq!(call.method, Method::PUT);
        assert_eq!(call.body["spec"]["holderIdentity"], Value::Null);
        assert_eq!(call.body["metadata"]["resourceVersion"], "2");
        let body = call.body.clone();
        call.ok(&body);
    });
}

#[tokio::test(start_paused = true)]
async fn a_leader_whose_api_server_never_answers_stops_by_the_renew_deadline_and_calls_no_ec2() {
    use fleetlb_controller::provider::Provider;
    use fleetlb_controller::provider::leader_only::LeaderOnly;
    let (mut e, mut api) = elector("replica-a");
    let (leads, ()) = tokio::join!(e.step(), async {
        api.next().await.ok(&lease("replica-a", "1"));
        let renewal = api.next().await;
        let body = renewal.body.clone();
        renewal.ok(&body);
    });
    assert!(leads);
    let renewed = tokio::time::Instant::now();
    let (tx, leader) = watch::channel(true);
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let gated = LeaderOnly::new(
        Arc::new(Counting(calls.clone())),
        leader.clone(),
        fleetlb_controller::lease::Term::unbounded(),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let election = tokio::spawn(fleetlb_controller::lease::run(e, tx, async move {
        let mut rx = stop_rx;
        let _ = rx.wait_for(|s| *s).await;
    }));
    // From now on the API server reads every request and never answers.
    let held = tokio::spawn(async move {
        let mut calls = Vec::new();
        loop {
            calls.push(api.next_unbounded().await);
        }
    });
    let mut watch_leader = leader.clone();
    tokio::time::timeout(Duration::from_secs(60), watch_leader.wait_for(|l| !*l))
        .await
        .expect("leadership ends while the API server does not answer")
        .unwrap();
    let after = renewed.elapsed();
    assert!(
        after <= LeaseConfig::new(String::new(), String::new(), String::new()).renew_deadline,
        "stopped leading {after:?} after the last renewal"
    );
    assert!(gated.terminate(&["i-1".into()]).await.is_err());
    assert!(gated.launch(&dummy_launch()).await.is_err());
    assert!(gated.release(&["i-1".into()]).await.is_err());
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "an EC2 call after leadership ended"
    );
    stop_tx.send_replace(true);
    // Shutting down does not hang on the dead API server either.
    tokio::time::timeout(Duration::from_secs(60), election)
        .await
        .expect("the election loop ends despite the hung API server")
        .unwrap();
    held.abort();
}

/// A provider that counts the calls that change something.
struct Counting(Arc<std::sync::atomic::AtomicU64>);

impl fleetlb_controller::provider::Provider for Counting {
    fn kind(&self) -> fleetlb_controller::provider::ProviderKind {
        fleetlb_controller::provider::ProviderKind::Aws
    }
    fn list<'a>(
        &'a self,
        _: &'a [Arc<BackendCluster>],
    ) -> futures::future::BoxFuture<
        'a,
        Result<Vec<fleetlb_controller::provider::Instance>, fleetlb_controller::Error>,
    > {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn launch<'a>(
        &'a self,
        _: &'a fleetlb_controller::provider::LaunchRequest,
    ) -> futures::future::BoxFuture<
        'a,
        Result<fleetlb_controller::provider::Launch, fleetlb_controller::Error>,
    > {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async { Ok(fleetlb_controller::provider::Launch::Pending) })
    }
    fn terminate<'a>(
        &'a self,
        _: &'a [String],
    ) -> futures::future::BoxFuture<'a, Result<(), fleetlb_controller::Error>> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
    fn release<'a>(
        &'a self,
        _: &'a [String],
    ) -> futures::future::BoxFuture<'a, Result<(), fleetlb_controller::Error>> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
}

fn dummy_launch() -> fleetlb_controller::provider::LaunchRequest {
    fleetlb_controller::provider::LaunchRequest {
        grpc: false,
        capacity_type: Default::default(),
        instance_types: Vec::new(),
        owner: fleetlb_controller::provider::ClusterKey {
            namespace: "default".into(),
            name: "web".into(),
        },
        owner_uid: "uid-web".into(),
        slot: 0,
        instance_type: "t2.micro".into(),
        port: 8000,
        provider: fleetlb_crds::ProviderSpec::Local(Default::default()),
        spec_hash: "h".into(),
        attempt: 0,
        token_scope: String::new(),
        replay: false,
    }
}

#[tokio::test]
async fn without_a_controller_id_run_derives_one_from_the_kube_system_namespace() {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let mut api = ApiServer(handle, Default::default());
    let (id, ()) = tokio::join!(kubernetes::controller_id_from_cluster(client), async {
        let call = api.next().await;
        assert_eq!(call.method, Method::GET);
        assert_eq!(call.uri, "/api/v1/namespaces/kube-system");
        call.ok(&json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "kube-system", "uid": "4a1c1f0e-7b52-4c43-9d7e-2f1f2b4e9a10"}}));
    });
    assert_eq!(id.unwrap(), "fleetlb-4a1c1f0e-7b52-4c43-9d7e-2f1f2b4e9a10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orphan_sweep_asks_the_api_server_before_terminating() {
    use fleetlb_controller::provider::{ClusterKey, Launch, LaunchRequest, Provider};
    let env = env().await;
    // An instance of this install whose object the store does not know (a stalled watch).
    let obj = object(&env, 1, true);
    let aws = AwsProvider::new(
        &env.conf,
        "ctl-kube".into(),
        Metrics::new(&prometheus::Registry::new()).unwrap(),
    );
    let req = LaunchRequest {
        grpc: false,
        capacity_type: Default::default(),
        instance_types: Vec::new(),
        owner: ClusterKey::of(&obj),
        owner_uid: "uid-web".into(),
        slot: 0,
        instance_type: "t2.micro".into(),
        port: 8000,
        provider: obj.spec.provider.clone(),
        spec_hash: "h".into(),
        attempt: 0,
        token_scope: String::new(),
        replay: false,
    };
    assert!(matches!(aws.launch(&req).await.unwrap(), Launch::Made(_)));
    let mut h = harness_with(&env, true, &[], {
        let mut cfg = KubeConfig::default();
        cfg.core.orphan_grace = Duration::ZERO;
        cfg
    });
    let sweep =
        |ctx: Arc<Context>| tokio::spawn(async move { kubernetes::sweep_orphans(&ctx).await });
    let owner_uri = "/apis/fleetlb.dev/v1alpha1/namespaces/default/backendclusters/web";
    // The API server still has the owner: nothing is terminated.
    let t = sweep(h.ctx.clone());
    let call = h.api.next().await;
    assert_eq!(call.method, Method::GET);
    assert!(call.uri.starts_with(owner_uri), "{}", call.uri);
    call.ok(&json!(obj));
    tokio::time::timeout(DEADLINE, t).await.unwrap().unwrap();
    assert_eq!(
        live_instances(&env).await.len(),
        1,
        "swept an owned instance"
    );
    // The API server cannot tell: nothing is terminated either.
    let t = sweep(h.ctx.clone());
    h.api.next().await.status(500, "InternalError");
    tokio::time::timeout(DEADLINE, t).await.unwrap().unwrap();
    assert_eq!(
        live_instances(&env).await.len(),
        1,
        "swept on an unanswered check"
    );
    // Gone for real: terminated.
    let t = sweep(h.ctx.clone());
    let call = h.api.next().await;
    assert!(call.uri.starts_with(owner_uri), "{}", call.uri);
    call.status(404, "NotFound");
    tokio::time::timeout(DEADLINE, t).await.unwrap().unwrap();
    assert!(
        live_instances(&env).await.is_empty(),
        "orphan not terminated"
    );
}
