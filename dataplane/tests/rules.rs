//! Host rules and weighted clusters through the proxy, with real upstreams on 127.0.0.1.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use bytes::Bytes;
use fleetlb_dataplane::{ProxyConfig, RouteConfig, RouteTable};
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::*;

/// `up` as cluster `name` at `prefix` for `hosts`.
fn rule(up: &Upstream, hosts: &[&str], prefix: &str, weight: Option<u32>) -> RouteConfig {
    let mut r = route(vec![up.endpoint()]);
    r.cluster = up.name.clone();
    r.prefix = prefix.into();
    r.hosts = hosts.iter().map(|h| h.to_string()).collect();
    r.weight = weight;
    r
}

/// GET `path` with `Host: host` over HTTP/1.1: (status, body).
async fn get_host(c: &TestClient, proxy: &Proxy, host: &str, path: &str) -> (u16, String) {
    let req = Request::get(proxy.url(path))
        .header(http::header::HOST, host)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_by_host_then_longest_prefix() {
    let shop = Upstream::start("shop").await;
    let wild = Upstream::start("wild").await;
    let api = Upstream::start("api").await;
    let any = Upstream::start("any").await;
    let proxy = Proxy::start(
        ProxyConfig::default(),
        vec![
            rule(&shop, &["shop.example.com"], "/", None),
            rule(&wild, &["*.Example.com"], "/", None),
            rule(&api, &[], "/api", None),
            rule(&any, &[], "/", None),
        ],
    )
    .await;
    proxy.wait_healthy(4).await;
    let c = client();
    for (host, path, want) in [
        ("shop.example.com", "/x", "shop"),
        // The exact host wins over a longer host-less prefix; case, port, trailing dot ignored.
        ("SHOP.example.com:8000", "/api/x", "shop"),
        ("shop.example.com.", "/", "shop"),
        ("blog.example.com", "/", "wild"),
        // One label only: deeper names fall through to the host-less rules.
        ("a.blog.example.com", "/api", "api"),
        ("other.org", "/api/v1", "api"),
        ("other.org", "/apiv1", "any"),
        ("127.0.0.1", "/", "any"),
    ] {
        assert_eq!(
            get_host(&c, &proxy, host, path).await,
            (200, want.to_string()),
            "Host: {host}, {path}"
        );
    }

    // HTTP/2: the rule follows `:authority`.
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for (authority, want) in [
        ("Blog.Example.com:8443", "wild"),
        ("shop.example.com", "shop"),
    ] {
        let req = Request::get(format!("http://{authority}/x"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, want, ":authority {authority}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_matching_host_and_path_is_a_404() {
    let a = Upstream::start("a").await;
    let proxy = Proxy::start(
        ProxyConfig::default(),
        vec![rule(&a, &["a.example.com"], "/a", None)],
    )
    .await;
    proxy.wait_healthy(1).await;
    let c = client();
    assert_eq!(get_host(&c, &proxy, "a.example.com", "/a/1").await.0, 200);
    for (host, path) in [("b.example.com", "/a"), ("a.example.com", "/b")] {
        assert_eq!(
            get_host(&c, &proxy, host, path).await,
            (404, "no route for this host and path\n".into()),
            "{host}{path}"
        );
    }
}

/// How many of `n` requests to `path` each upstream answered, and every failure.
async fn split(proxy: &Proxy, path: &str, n: usize) -> (HashMap<String, usize>, Vec<String>) {
    let results = load(proxy.url(path), n, 8).await;
    let mut by = HashMap::new();
    for (_, body) in results.iter().flatten() {
        *by.entry(body.clone()).or_default() += 1;
    }
    (by, failures(&results))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_clusters_split_by_weight_and_one_without_healthy_endpoints_drops_out() {
    let blue = Upstream::start("blue").await;
    let mut green = Upstream::start("green").await;
    let table = |b: u32, g: u32| RouteTable {
        routes: vec![
            rule(&blue, &[], "/c", Some(b)),
            rule(&green, &[], "/c", Some(g)),
        ],
    };
    let proxy = Proxy::start(ProxyConfig::default(), table(90, 10).routes).await;
    proxy.wait_healthy(2).await;

    // 90/10: with 2000 requests the green share is 10 % +/- 3 % (4.5 standard deviations).
    let (by, failed) = split(&proxy, "/c", 2000).await;
    assert!(failed.is_empty(), "{failed:?}");
    let green_share = by.get("green").copied().unwrap_or(0) as f64 / 2000.0;
    assert!((0.07..=0.13).contains(&green_share), "{by:?}");

    // A weight change applies to the next requests without failing one in flight.
    let running = Arc::new(AtomicBool::new(true));
    let background = {
        let (url, running) = (proxy.url("/c"), running.clone());
        tokio::spawn(async move {
            let c = client();
            let mut out = Vec::new();
            while running.load(Relaxed) {
                out.push(get(&c, &url).await);
            }
            out
        })
    };
    for (b, g) in [(50, 50), (10, 90), (50, 50)] {
        proxy.routes.send(table(b, g)).unwrap();
        let (by, failed) = split(&proxy, "/c", 600).await;
        assert!(failed.is_empty(), "{failed:?}");
        let g_share = by.get("green").copied().unwrap_or(0) as f64 / 600.0;
        let want = f64::from(g) / 100.0;
        // 600 requests: within 0.09 is over 4.4 standard deviations at any of these weights.
        assert!((g_share - want).abs() <= 0.09, "{b}/{g}: {by:?}");
    }
    running.store(false, Relaxed);
    let during = background.await.unwrap();
    assert!(!during.is_empty());
    assert!(failures(&during).is_empty(), "{:?}", failures(&during));

    // Green's only instance dies: once it is found unhealthy, every request goes to blue
    // instead of a tenth failing.
    green.kill();
    proxy.wait_unhealthy("green").await;
    let (by, failed) = split(&proxy, "/c", 500).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(by.get("blue"), Some(&500), "{by:?}");

    // /debug/endpoints shows the split.
    let snap = proxy.dataplane.snapshot();
    let weights: Vec<(String, Option<u32>)> =
        snap.iter().map(|c| (c.cluster.clone(), c.weight)).collect();
    assert!(weights.contains(&("blue".into(), Some(50))), "{weights:?}");
    assert!(weights.contains(&("green".into(), Some(50))), "{weights:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_weight_zero_is_a_503_that_says_so() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let proxy = Proxy::start(
        ProxyConfig::default(),
        vec![rule(&a, &[], "/c", Some(0)), rule(&b, &[], "/c", Some(0))],
    )
    .await;
    proxy.wait_healthy(2).await;
    let c = client();
    assert_eq!(
        get(&c, &proxy.url("/c")).await.unwrap(),
        (503, "every cluster of this route has weight 0\n".into())
    );
    assert_eq!(a.hits.load(Relaxed) + b.hits.load(Relaxed), 0);
}
