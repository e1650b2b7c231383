//! The autoscaler with several proxy replicas, as in Kubernetes: two real proxies on 127.0.0.1
//! each carry part of one cluster's load; each replica reads the other's `/debug/load` through
//! its admin port and sums it with its own, so whichever replica leads writes the same count to
//! `status.autoscaling` (through the scripted API server), with the same `Scaled` Event, and
//! launches toward it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleetlb_controller::Providers;
use fleetlb_controller::core::{Core, Settings};
use fleetlb_controller::kubernetes::{self, Context, FINALIZER, KubeConfig, Wiring};
use fleetlb_controller::metrics::Metrics;
use fleetlb_crds::BackendCluster;
use fleetlb_dataplane::admin::AdminState;
use fleetlb_dataplane::{Dataplane, EndpointConfig, ProxyConfig, RouteConfig, RouteTable};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use kube::runtime::events::Reporter;
use kube::runtime::{reflector, watcher};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

mod support;
use support::fake::{self, Fake};

/// An instance that answers `/health` at once and holds every other request until `release`
/// turns true.
async fn holding_backend() -> (SocketAddr, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (release, rx) = watch::channel(false);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let rx = rx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let mut rx = rx.clone();
                    async move {
                        if req.uri().path() != "/health" {
                            let _ = rx.wait_for(|r| *r).await;
                        }
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, release)
}

/// One fleetlb replica's data plane: its proxy and admin port on 127.0.0.1, routing `/auto`
/// to `backend`.
struct Replica {
    dataplane: Dataplane,
    registry: prometheus::Registry,
    proxy: SocketAddr,
    admin: SocketAddr,
    stop_admin: Option<oneshot::Sender<()>>,
    _routes: watch::Sender<RouteTable>,
    _held: Vec<TcpStream>,
}

async fn replica(backend: SocketAddr) -> Replica {
    let registry = prometheus::Registry::new();
    let dataplane = Dataplane::new(ProxyConfig::default(), &registry).unwrap();
    let mut route = RouteConfig::new(
        "auto",
        "/auto",
        vec![EndpointConfig::new("i-0001", backend)],
    );
    route.health.interval = Duration::from_millis(100);
    route.health.healthy_threshold = 1;
    route.balancing.slow_start = Duration::ZERO;
    let (routes, rx) = watch::channel(RouteTable {
        routes: vec![route],
    });
    dataplane.watch_routes(rx);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let dp = dataplane.clone();
    tokio::spawn(async move { dp.serve(listener, std::future::pending()).await });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = listener.local_addr().unwrap();
    let state = Arc::new(AdminState {
        registry: registry.clone(),
        dataplane: dataplane.clone(),
        status: watch::channel(Bytes::new()).1,
        ready: watch::channel(true).1,
        draining: watch::channel(false).1,
        tls: None,
    });
    let (stop_admin, stopped) = oneshot::channel::<()>();
    tokio::spawn(fleetlb_dataplane::admin::serve(listener, state, async {
        let _ = stopped.await;
    }));
    Replica {
        dataplane,
        registry,
        proxy,
        admin,
        stop_admin: Some(stop_admin),
        _routes: routes,
        _held: Vec::new(),
    }
}

impl Replica {
    /// Sends `n` requests the backend holds, and waits until the proxy has them in flight.
    async fn hold(&mut self, n: u64) {
        let dp = self.dataplane.clone();
        support::eventually("the instance passes its health check", || {
            dp.cluster_snapshot("auto")
                .is_some_and(|c| c.endpoints.iter().all(|e| e.healthy))
        })
        .await;
        let before = self.inflight();
        for _ in 0..n {
            let mut s = TcpStream::connect(self.proxy).await.unwrap();
            s.write_all(b"GET /auto/work HTTP/1.1\r\nhost: shop\r\n\r\n")
                .await
                .unwrap();
            self._held.push(s);
        }
        support::eventually("the proxy has the requests in flight", || {
            self.inflight() == before + n
        })
        .await;
    }

    fn inflight(&self) -> u64 {
        self.dataplane
            .load()
            .iter()
            .find(|c| c.cluster == "auto")
            .map_or(0, |c| c.inflight)
    }

    fn gauge(&self, name: &str) -> f64 {
        support::metric(&self.registry, name)
    }
}

fn object() -> Value {
    json!({
        "apiVersion": "fleetlb.dev/v1alpha1",
        "kind": "BackendCluster",
        "metadata": {
            "name": "auto", "namespace": "default", "uid": "uid-auto", "generation": 1,
            "resourceVersion": "1", "finalizers": [FINALIZER],
            "creationTimestamp": "2026-11-28T00:00:00Z",
        },
        "spec": {
            "route": "/auto", "replicas": 1, "instanceType": "t2.micro",
            "provider": {"local": {}},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 10, "targetInflightPerInstance": 4},
        },
    })
}

/// One replica's controller, leading, with `peers` as its `--peers`.
fn controller(r: &Replica, peers: Vec<String>) -> (Arc<Context>, Arc<Fake>, fake::RecordedHandle) {
    let provider = Arc::new(Fake::default());
    let mut cfg = KubeConfig::default();
    cfg.core = Settings { peers, ..cfg.core };
    let core = Core::new(
        Providers {
            local: Some(provider.clone()),
            ..Providers::default()
        },
        r.dataplane.clone(),
        Metrics::new(&r.registry).unwrap(),
        cfg.core.clone(),
    );
    let (client, recorded, api) = fake::api_server(BTreeMap::from([("auto".into(), object())]));
    let (store, mut writer) = reflector::store();
    let bc: BackendCluster = serde_json::from_value(object()).unwrap();
    writer.apply_watcher_event(&watcher::Event::Apply(bc.into()));
    let wiring = Wiring {
        client,
        reporter: Reporter {
            controller: "fleetlb".into(),
            instance: Some(format!("replica-{}", r.admin.port())),
        },
        leader: watch::channel(true).1,
        term: fleetlb_controller::lease::Term::unbounded(),
        routes: watch::channel(RouteTable::default()).0,
        status: watch::channel(Bytes::new()).0,
    };
    let ctx = Arc::new(Context::new(wiring, core, store, cfg));
    (ctx, provider, fake::RecordedHandle { recorded, api })
}

async fn reconcile(ctx: &Arc<Context>) {
    let bc: BackendCluster = serde_json::from_value(object()).unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        kubernetes::reconcile(Arc::new(bc.into()), ctx.clone()),
    )
    .await
    .expect("a reconcile ends")
    .expect("a reconcile succeeds");
}

#[tokio::test]
async fn the_leader_scales_on_the_load_of_every_replica_whichever_leads() {
    let (backend, release) = holding_backend().await;
    let mut a = replica(backend).await;
    let mut b = replica(backend).await;
    // 6 in flight through one replica, 10 through the other: neither alone is the load.
    a.hold(6).await;
    b.hold(10).await;
    // Each replica's peers include itself, as a headless Service's name does.
    let peers = vec![a.admin.to_string(), b.admin.to_string()];
    let (ctx_a, launched_a, rec_a) = controller(&a, peers.clone());
    let (ctx_b, launched_b, rec_b) = controller(&b, peers);

    for (ctx, r, launched, rec) in [
        (&ctx_a, &a, &launched_a, &rec_a),
        (&ctx_b, &b, &launched_b, &rec_b),
    ] {
        ctx.core.sample().await;
        // Two proxies summed, each once (the replica's own reading is not counted twice).
        assert_eq!(r.gauge("fleetlb_autoscaler_proxies"), 2.0);
        reconcile(ctx).await;
        let recorded = rec.recorded.lock().unwrap();
        // 16 in flight on 1 instance, target 4: 4 instances, at once (the panic window).
        let status = &recorded.statuses["auto"]["autoscaling"];
        assert_eq!(status["desiredReplicas"], 4, "{status}");
        assert_eq!(status["inflightPerInstance"], 16.0, "{status}");
        assert_eq!(status["panic"], true, "{status}");
        let scaled: Vec<&str> = recorded.events["auto"]
            .iter()
            .filter(|e| e["reason"] == "Scaled")
            .map(|e| e["note"].as_str().unwrap())
            .collect();
        assert_eq!(
            scaled,
            ["scaled 1 -> 4: 16.0 in flight per instance, target 4 (panic window: a burst)"]
        );
        assert_eq!(r.gauge("fleetlb_autoscaler_desired_replicas"), 4.0);
        // The plan follows the decision.
        assert_eq!(launched.instances.lock().unwrap().len(), 4);
    }

    // A peer that stops answering: its last reading counts for a few seconds, then the sum
    // goes on without it (and, the reading being incomplete, nothing scales down: unit-tested
    // in autoscale.rs); the misses are counted.
    let _ = b.stop_admin.take().unwrap().send(());
    ctx_a.core.sample().await;
    assert_eq!(a.gauge("fleetlb_autoscaler_peers_missing"), 1.0);
    assert!(a.gauge("fleetlb_autoscaler_peer_failures_total") >= 1.0);
    // Right after the miss the silent peer still counts with its last reading.
    assert_eq!(a.gauge("fleetlb_autoscaler_proxies"), 2.0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while a.gauge("fleetlb_autoscaler_proxies") != 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a silent peer is dropped from the sum"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        ctx_a.core.sample().await;
    }
    release.send_replace(true);
}
