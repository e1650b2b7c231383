//! The data plane through real sockets: real upstream servers on 127.0.0.1, real clients.

mod support;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use fleetlb_dataplane::{ProxyConfig, RouteConfig, RouteTable};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Three upstreams `a`, `b`, `c` behind route `/c`, all healthy.
async fn three_healthy() -> ([Upstream; 3], Proxy) {
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let proxy = Proxy::start(
        ProxyConfig::default(),
        vec![route(ups.iter().map(|u| u.endpoint()).collect())],
    )
    .await;
    proxy.wait_healthy(3).await;
    (ups, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_moves_away_from_a_backend_that_becomes_slow() {
    let (ups, proxy) = three_healthy().await;
    assert_eq!(ok_count(&load(proxy.url("/c"), 300, 4).await), 300);

    ups[0].delay_ms.store(60, Relaxed);
    let before: Vec<u64> = ups.iter().map(|u| u.hits.load(Relaxed)).collect();
    let results = load(proxy.url("/c"), 600, 4).await;
    assert_eq!(ok_count(&results), 600, "{:?}", failures(&results));
    let got: Vec<u64> = ups
        .iter()
        .zip(&before)
        .map(|(u, b)| u.hits.load(Relaxed) - b)
        .collect();
    assert!(
        got[0] < 30,
        "the slow backend still got {} of 600 requests ({got:?})",
        got[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_answering_fast_500s_gets_little_traffic() {
    let (ups, proxy) = three_healthy().await;
    // Its health check still passes: only real traffic reveals the failures.
    ups[0].status.store(500, Relaxed);
    let results = load(proxy.url("/c"), 600, 4).await;
    let sick = ups[0].hits.load(Relaxed);
    assert!(sick <= 15, "the failing backend got {sick} of 600 requests");
    assert!(ok_count(&results) >= 585, "{:?}", failures(&results));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_backend_mid_load_fails_no_get() {
    let mut ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    for u in &ups {
        u.delay_ms.store(2, Relaxed);
    }
    let proxy = Proxy::start(
        ProxyConfig::default(),
        vec![route(ups.iter().map(|u| u.endpoint()).collect())],
    )
    .await;
    proxy.wait_healthy(3).await;
    let running = tokio::spawn(load(proxy.url("/c"), 3000, 16));
    let hits = ups[0].hits.clone();
    eventually("load reaches the first backend", || hits.load(Relaxed) > 50).await;
    ups[0].kill();
    let results = running.await.unwrap();
    assert_eq!(
        failures(&results),
        Vec::<String>::new(),
        "clients saw errors when a backend died"
    );
    assert_eq!(results.len(), 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_endpoint_set_updates_during_load_fail_no_request() {
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let all: Vec<_> = ups.iter().map(|u| u.endpoint()).collect();
    let proxy = Proxy::start(ProxyConfig::default(), vec![route(all.clone())]).await;
    proxy.wait_healthy(3).await;
    let running = tokio::spawn(load(proxy.url("/c"), 3000, 8));
    // Churn the set; endpoint b stays in every version so the route is never empty.
    let sets = [
        vec![all[0].clone(), all[1].clone()],
        vec![all[1].clone(), all[2].clone()],
        all.clone(),
    ];
    let mut updates = 0;
    while !running.is_finished() || updates < 1000 {
        let _ = proxy.routes.send(RouteTable {
            routes: vec![route(sets[updates % 3].clone())],
        });
        updates += 1;
        tokio::task::yield_now().await;
    }
    let results = running.await.unwrap();
    assert!(updates >= 1000);
    assert_eq!(failures(&results), Vec::<String>::new());
    assert_eq!(results.len(), 3000);
}

/// The autoscaler's signal: what a cluster has in flight and has answered, as the proxy sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_load_counts_requests_in_flight_and_answered() {
    let up = Upstream::start("a").await;
    let proxy = Proxy::start(ProxyConfig::default(), vec![route(vec![up.endpoint()])]).await;
    proxy.wait_healthy(1).await;
    let load = |p: &Proxy| {
        p.dataplane
            .load()
            .into_iter()
            .find(|l| l.cluster == "c")
            .unwrap()
    };
    assert_eq!((load(&proxy).inflight, load(&proxy).answered), (0, 0));
    up.delay_ms.store(2_000, Relaxed);
    let url = proxy.url("/c");
    let slow: Vec<_> = (0..5)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&client(), &url).await })
        })
        .collect();
    eventually("5 requests in flight", || load(&proxy).inflight == 5).await;
    for r in slow {
        assert_eq!(r.await.unwrap(), Ok((200, "a".to_string())));
    }
    let l = load(&proxy);
    assert_eq!((l.inflight, l.answered), (0, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_requests_in_flight() {
    let up = Upstream::start("a").await;
    up.delay_ms.store(400, Relaxed);
    let mut proxy = Proxy::start(ProxyConfig::default(), vec![route(vec![up.endpoint()])]).await;
    proxy.wait_healthy(1).await;
    let url = proxy.url("/c");
    let inflight = tokio::spawn(async move { get(&client(), &url).await });
    eventually("request reaches the upstream", || {
        up.hits.load(Relaxed) == 1
    })
    .await;
    let _ = proxy.stop.take().unwrap().send(());
    let r = tokio::time::timeout(DEADLINE, inflight)
        .await
        .expect("drained request finished")
        .unwrap();
    assert_eq!(r, Ok((200, "a".to_string())));
    tokio::time::timeout(DEADLINE, &mut proxy.done)
        .await
        .expect("serve returns after draining")
        .unwrap();
    assert!(
        TcpStream::connect(proxy.addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_cut_off_while_others_are_served() {
    let up = Upstream::start("a").await;
    let cfg = ProxyConfig {
        limits: fleetlb_dataplane::Limits {
            head_timeout: Duration::from_millis(500),
            ..Default::default()
        },
        ..Default::default()
    };
    let proxy = Proxy::start(cfg, vec![route(vec![up.endpoint()])]).await;
    proxy.wait_healthy(1).await;
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET /c HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Others are served meanwhile.
    assert_eq!(
        get(&client(), &proxy.url("/c")).await,
        Ok((200, "a".into()))
    );
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(DEADLINE, async {
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "slow client never cut off");
    assert_eq!(
        up.hits.load(Relaxed),
        1,
        "the incomplete request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431() {
    let (up, proxy) = one_healthy(ProxyConfig::default()).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let big = "x".repeat(100 * 1024);
    let req = format!("GET /c HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    assert_eq!(up.hits.load(Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_404_and_empty_clusters_503() {
    let proxy = Proxy::start(ProxyConfig::default(), vec![route(vec![])]).await;
    let c = client();
    assert_eq!(
        get(&c, &proxy.url("/nope")).await,
        Ok((404, "no route for this host and path\n".into()))
    );
    assert_eq!(
        get(&c, &proxy.url("/c10")).await.unwrap().0,
        404,
        "/c10 must not match /c"
    );
    assert_eq!(
        get(&c, &proxy.url("/c/x")).await,
        Ok((503, "no healthy endpoint\n".into()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_reach_the_upstream() {
    let (_up, proxy) = one_healthy(ProxyConfig::default()).await;
    let resp = client()
        .get(proxy.url("/c").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        resp.headers().get("x-seen-forwarded-for").unwrap(),
        "127.0.0.1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_style_upgrades_pass_through() {
    let (_up, proxy) = one_healthy(ProxyConfig::default()).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"GET /c/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"ping through the tunnel").await.unwrap();
    let mut echo = vec![0u8; 23];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"ping through the tunnel");
    // Any other upgrade (h2c above all: a direct HTTP/2 line to the backend, past fleetlb's
    // routing) goes on as a plain request, its Upgrade stripped.
    let r = exchange(
        proxy.addr,
        b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_backend_costs_a_504_at_the_timeout_then_is_avoided() {
    let ups = [Upstream::start("a").await, Upstream::start("b").await];
    let mut r = route(ups.iter().map(|u| u.endpoint()).collect());
    r.request_timeout = Duration::from_millis(300);
    let proxy = Proxy::start(ProxyConfig::default(), vec![r]).await;
    proxy.wait_healthy(2).await;
    ups[0].delay_ms.store(60_000, Relaxed);
    let results = load(proxy.url("/c"), 200, 4).await;
    let timeouts = results.iter().filter(|r| matches!(r, Ok((504, _)))).count();
    assert!(timeouts >= 1, "the hung backend never timed out");
    assert!(
        timeouts <= 10,
        "{timeouts} requests went to the hung backend"
    );
    assert_eq!(
        ok_count(&results) + timeouts,
        200,
        "{:?}",
        failures(&results)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_get_a_clean_503() {
    let up = Upstream::start("a").await;
    let cfg = ProxyConfig {
        limits: fleetlb_dataplane::Limits {
            max_connections: 2,
            ..Default::default()
        },
        ..Default::default()
    };
    let proxy = Proxy::start(cfg, vec![route(vec![up.endpoint()])]).await;
    proxy.wait_healthy(1).await;
    let _held1 = TcpStream::connect(proxy.addr).await.unwrap();
    let _held2 = TcpStream::connect(proxy.addr).await.unwrap();
    let mut third = TcpStream::connect(proxy.addr).await.unwrap();
    let text = read_to_close(&mut third).await;
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.ends_with("connection limit reached\n"), "{text}");
    drop(_held1);
    // A slot frees up: new clients are served again.
    let c = client();
    let url = proxy.url("/c");
    let mut served = false;
    for _ in 0..100 {
        if let Ok((200, _)) = get(&c, &url).await {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "a freed connection slot was never reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_framing_never_reaches_the_upstream() {
    let (up, proxy) = one_healthy(ProxyConfig::default()).await;

    // Content-Length and chunked together: the chunked body (5 bytes) is what is forwarded,
    // and the stale length does not travel with it.
    let text = exchange(proxy.addr, b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        .await
        .to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("x-seen-body-bytes: 5"), "{text}");
    assert!(
        !text.contains("x-seen-content-length: 3"),
        "the stale Content-Length reached the upstream: {text}"
    );

    // Two different Content-Length values: rejected with 400 before any upstream sees it.
    let before = up.hits.load(Relaxed);
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await
    .unwrap();
    let r = read_to_close(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert_eq!(up.hits.load(Relaxed), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_served() {
    let (_up, proxy) = one_healthy(ProxyConfig::default()).await;
    let h2: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let resp = h2.get(proxy.url("/c").parse().unwrap()).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    // The client's `:authority` reaches the HTTP/1.1 backend as `Host` and X-Forwarded-Host.
    let authority = proxy.addr.to_string();
    assert_eq!(resp.headers()["x-seen-host"], authority.as_str());
    assert_eq!(resp.headers()["x-seen-forwarded-host"], authority.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_can_take_over_the_proxy_port() {
    let first = fleetlb_dataplane::listen(
        "127.0.0.1:0".parse().unwrap(),
        fleetlb_dataplane::Reuse::Port,
    )
    .unwrap();
    let addr = first.local_addr().unwrap();
    // The successor binds while the old listener is still open...
    let second = fleetlb_dataplane::listen(addr, fleetlb_dataplane::Reuse::Port)
        .expect("SO_REUSEPORT lets a successor bind");
    // ...and once the old one closes, connections keep being accepted.
    drop(first);
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), second.accept());
    assert!(client.is_ok() && accepted.is_ok());
    // Without SO_REUSEPORT the port is exclusive.
    assert!(fleetlb_dataplane::listen(addr, fleetlb_dataplane::Reuse::Address).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_controller_gone_the_last_endpoint_set_keeps_serving_and_probing() {
    let (mut ups, mut proxy) = three_healthy().await;
    // The controller's end of the channel goes away (process crashed, API server unreachable).
    let (orphan, _) = tokio::sync::watch::channel(RouteTable::default());
    drop(std::mem::replace(&mut proxy.routes, orphan));
    let c = client();
    for _ in 0..30 {
        assert_eq!(get(&c, &proxy.url("/c")).await.map(|r| r.0), Ok(200));
    }
    // Probing goes on: a backend that dies is found unhealthy and avoided, without a controller.
    ups[0].kill();
    proxy.wait_unhealthy("a").await;
    let results = load(proxy.url("/c"), 300, 4).await;
    assert_eq!(failures(&results), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_every_backend_down_gets_503s_others_are_unaffected_and_it_recovers() {
    let mut a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let mut d = RouteConfig::new("d", "/d", vec![b.endpoint()]);
    d.health = fast_health();
    let proxy = Proxy::start(ProxyConfig::default(), vec![route(vec![a.endpoint()]), d]).await;
    proxy.wait_healthy(2).await;
    a.kill();
    let c = client();
    proxy.wait_unhealthy("a").await;
    for _ in 0..20 {
        let r = get(&c, &proxy.url("/c")).await.unwrap();
        assert_eq!(r.0, 503, "{r:?}");
        assert_eq!(get(&c, &proxy.url("/d")).await.map(|r| r.0), Ok(200));
    }
    // The backend comes back on the same address: served again, no restart of fleetlb.
    a.restart().await;
    proxy.wait_healthy(2).await;
    let url = proxy.url("/c");
    let mut ok = false;
    for _ in 0..50 {
        if get(&c, &url).await.map(|r| r.0) == Ok(200) {
            ok = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(ok, "the recovered backend is not served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_threads_share_the_port_and_drain_on_shutdown() {
    let a = Upstream::start("a").await;
    let t = Threaded::start(ProxyConfig::default(), &a, 3).await;
    let (addr, stop, threads) = (t.addr, t.stop, t.threads);
    // New connections land on all three threads' listeners; every one is served.
    for _ in 0..200 {
        let r = exchange(
            addr,
            b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    assert_eq!(a.hits.load(Relaxed), 200);
    stop.send(true).unwrap();
    tokio::time::timeout(
        DEADLINE,
        tokio::task::spawn_blocking(move || {
            for t in threads {
                t.join().unwrap();
            }
        }),
    )
    .await
    .expect("proxy threads stop")
    .unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_control_plane_returns_its_update_applies_without_losing_requests() {
    let (mut ups, proxy) = three_healthy().await;
    // Control plane silent (API server unreachable): a backend dies, probes notice on their own.
    let running = tokio::spawn(load(proxy.url("/c"), 2000, 4));
    ups[0].kill();
    proxy.wait_unhealthy("a").await;
    let dp = proxy.dataplane.clone();
    // It comes back with the set it computed meanwhile: the dead one replaced by a new one.
    let d = Upstream::start("d").await;
    proxy
        .routes
        .send(RouteTable {
            routes: vec![route(vec![
                ups[1].endpoint(),
                ups[2].endpoint(),
                d.endpoint(),
            ])],
        })
        .unwrap();
    let results = running.await.unwrap();
    assert_eq!(failures(&results), Vec::<String>::new());
    proxy.wait_healthy(3).await;
    let ids: Vec<String> = dp
        .snapshot()
        .iter()
        .flat_map(|c| c.endpoints.iter().map(|e| e.id.clone()))
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(
        ids.contains(&"d".to_string()) && !ids.contains(&"a".to_string()),
        "{ids:?}"
    );
    let after = load(proxy.url("/c"), 300, 4).await;
    assert_eq!(failures(&after), Vec::<String>::new());
    assert!(d.hits.load(Relaxed) > 0, "the new endpoint gets traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_holds_for_the_process_not_per_proxy_thread() {
    let a = Upstream::start("a").await;
    let cfg = ProxyConfig {
        limits: fleetlb_dataplane::Limits {
            max_connections: 3,
            ..Default::default()
        },
        ..Default::default()
    };
    let t = Threaded::start(cfg, &a, 2).await;
    let addr = t.addr;
    // Keep-alive connections, each kept open after its first answer.
    let mut held = Vec::new();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut head))
            .await
            .unwrap()
            .unwrap();
        statuses.push(String::from_utf8_lossy(&head[9..12]).to_string());
        held.push(s);
    }
    assert_eq!(statuses, ["200", "200", "200", "503", "503", "503"]);
}

/// A data plane serving route `/c` over `up` on `threads` proxy threads, `up` healthy.
struct Threaded {
    addr: std::net::SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    _routes: tokio::sync::watch::Sender<RouteTable>,
}

impl Threaded {
    async fn start(cfg: ProxyConfig, up: &Upstream, threads: usize) -> Self {
        let dataplane =
            fleetlb_dataplane::Dataplane::new(cfg, &prometheus::Registry::new()).unwrap();
        let (routes, rx) = tokio::sync::watch::channel(RouteTable {
            routes: vec![route(vec![up.endpoint()])],
        });
        dataplane.watch_routes(rx);
        let listener = fleetlb_dataplane::listen(
            "127.0.0.1:0".parse().unwrap(),
            fleetlb_dataplane::Reuse::Port,
        )
        .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let threads = dataplane
            .serve_threads(listener, threads, &stop_rx)
            .unwrap();
        eventually(&format!("{} healthy", up.name), || {
            dataplane
                .snapshot()
                .iter()
                .flat_map(|c| &c.endpoints)
                .any(|e| e.state == fleetlb_dataplane::EndpointState::Healthy)
        })
        .await;
        Self {
            addr,
            stop,
            threads,
            _routes: routes,
        }
    }
}
