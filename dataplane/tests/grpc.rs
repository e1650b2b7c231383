//! gRPC through fleetlb with a real client and real servers (Python grpcio, `grpc/peer.py`):
//! calls from one client connection spread per call, trailers intact, statuses counted by
//! whose doing they are, deadlines honoured and passed on, the gRPC health service probed.

mod support;

use std::process::Stdio;
use std::time::Duration;

use fleetlb_dataplane::{EndpointConfig, EndpointState, Protocol, ProxyConfig, RouteConfig};
use serde_json::Value;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc/peer.py");

/// `n` grpcio servers, each its own Python process (identical instances share no
/// interpreter lock), named `s0`.., whose modes tests switch.
struct Servers {
    peers: Vec<Server>,
    ports: Vec<u16>,
}

struct Server {
    child: Child,
    stdin: ChildStdin,
    answers: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Servers {
    /// `n` servers started with `args` after their name (peer.py's `serve NAME MAX`).
    async fn start_with(n: usize, args: &[&str]) -> Self {
        let mut peers = Vec::new();
        let mut ports = Vec::new();
        for i in 0..n {
            let mut child = Command::new("python3")
                .args([PEER, "serve", &format!("s{i}")])
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("python3 runs (grpcio: .ci/test installs it)");
            let stdin = child.stdin.take().unwrap();
            let mut answers = BufReader::new(child.stdout.take().unwrap()).lines();
            let first = tokio::time::timeout(DEADLINE, answers.next_line())
                .await
                .expect("the gRPC server starts")
                .unwrap()
                .expect("peer.py printed its port (is grpcio installed?)");
            let v: Value = serde_json::from_str(&first).unwrap();
            ports.push(v["port"].as_u64().unwrap() as u16);
            peers.push(Server {
                child,
                stdin,
                answers,
            });
        }
        Self { peers, ports }
    }

    fn endpoints(&self) -> Vec<EndpointConfig> {
        self.ports
            .iter()
            .enumerate()
            .map(|(i, p)| EndpointConfig::new(format!("s{i}"), ([127, 0, 0, 1], *p).into()))
            .collect()
    }

    /// How many connections server `i`'s `Say` calls came over.
    async fn connections(&mut self, i: usize) -> usize {
        self.ask(i, "connections").await
    }

    /// The most `Say` calls server `i` served at once.
    async fn most_at_once(&mut self, i: usize) -> usize {
        self.ask(i, "most").await
    }

    async fn ask(&mut self, i: usize, what: &str) -> usize {
        let s = &mut self.peers[i];
        s.stdin
            .write_all(format!("{what}\n").as_bytes())
            .await
            .unwrap();
        let n = s.answers.next_line().await.unwrap();
        n.as_deref().and_then(|n| n.parse().ok()).unwrap_or(0)
    }

    async fn set(&mut self, i: usize, mode: &str) {
        let s = &mut self.peers[i];
        s.stdin
            .write_all(format!("{mode}\n").as_bytes())
            .await
            .unwrap();
        let ack = s.answers.next_line().await.unwrap();
        assert_eq!(ack.as_deref(), Some("ok"));
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for s in &mut self.peers {
            let _ = s.child.start_kill();
        }
    }
}

fn grpc_route(endpoints: Vec<EndpointConfig>) -> RouteConfig {
    let mut r = RouteConfig::new("echo", "/fleetlb.demo.Echo", endpoints);
    r.protocol = Protocol::Grpc;
    r.health = fast_health();
    r.balancing.slow_start = Duration::ZERO;
    r
}

async fn behind_proxy(n: usize) -> (Servers, Proxy) {
    behind_proxy_with(n, &[], ProxyConfig::default(), |_| {}).await
}

/// `n` servers started with `args` behind a proxy with `cfg`, their route as `edit` makes it;
/// once every server is healthy.
async fn behind_proxy_with(
    n: usize,
    args: &[&str],
    cfg: ProxyConfig,
    edit: impl FnOnce(&mut RouteConfig),
) -> (Servers, Proxy) {
    let servers = Servers::start_with(n, args).await;
    let mut route = grpc_route(servers.endpoints());
    edit(&mut route);
    let proxy = Proxy::start(cfg, vec![route]).await;
    proxy.wait_healthy(n).await;
    (servers, proxy)
}

/// `n` calls through `proxy` over one client channel: peer.py's JSON summary.
async fn calls(proxy: &Proxy, n: usize, extra: &[&str]) -> Value {
    let out = Command::new("python3")
        .args([PEER, "call", &proxy.addr.to_string(), &n.to_string()])
        .args(extra)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn count(v: &Value, key: &str, name: &str) -> u64 {
    v[key][name].as_u64().unwrap_or(0)
}

fn state(proxy: &Proxy, id: &str) -> EndpointState {
    proxy
        .dataplane
        .snapshot()
        .iter()
        .flat_map(|c| c.endpoints.clone())
        .find(|e| e.id == id)
        .unwrap()
        .state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_and_streaming_calls_keep_their_trailers() {
    let (_servers, proxy) = behind_proxy(2).await;
    let v = calls(&proxy, 20, &[]).await;
    assert_eq!(count(&v, "codes", "OK"), 20, "{v}");
    let t = &v["trailers"];
    assert!(t["x-instance"].is_string(), "trailing metadata lost: {v}");
    let v = calls(&proxy, 3, &["--stream", "5"]).await;
    assert_eq!(count(&v, "codes", "OK"), 3, "{v}");
    assert_eq!(v["messages"].as_array().unwrap().len(), 15, "{v}");
    assert!(v["trailers"]["x-instance"].is_string(), "{v}");
    assert_eq!(
        proxy.metric(
            "fleetlb_grpc_calls_total",
            &[("grpc_status", "0"), ("source", "instance")]
        ),
        23.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_from_one_connection_spread_over_every_instance() {
    let (mut servers, proxy) = behind_proxy(4).await;
    // 20 ms calls: a busy test machine's scheduling noise is small beside them, as a real
    // service's is.
    for i in 0..4 {
        servers.set(i, "steady").await;
    }
    let v = calls(&proxy, 1000, &["--concurrency", "4"]).await;
    eprintln!("spread: {}", v["by_instance"]);
    assert_eq!(count(&v, "codes", "OK"), 1000, "{v}");
    for i in 0..4 {
        let got = count(&v, "by_instance", &format!("s{i}"));
        assert!(
            (200..=300).contains(&got),
            "s{i} got {got} of 1000 calls from one connection: {}",
            v["by_instance"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_instance_is_avoided() {
    let (mut servers, proxy) = behind_proxy(4).await;
    servers.set(0, "slow").await;
    // Its first calls teach the balancer; what follows goes elsewhere.
    let _ = calls(&proxy, 100, &["--concurrency", "2"]).await;
    let v = calls(&proxy, 400, &["--concurrency", "2"]).await;
    assert_eq!(count(&v, "codes", "OK"), 400, "{v}");
    let slow = count(&v, "by_instance", "s0");
    assert!(
        slow < 40,
        "the 60 ms instance got {slow} of 400 calls: {}",
        v["by_instance"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_is_ejected_and_retried_invalid_argument_never() {
    let (mut servers, proxy) = behind_proxy(4).await;
    servers.set(0, "unavailable").await;
    servers.set(1, "invalid").await;
    let v = calls(&proxy, 300, &["--concurrency", "2"]).await;
    // UNAVAILABLE before any answer went to another instance: the caller never saw it.
    assert_eq!(count(&v, "codes", "UNAVAILABLE"), 0, "{v}");
    assert!(count(&v, "codes", "INVALID_ARGUMENT") > 0, "{v}");
    assert_eq!(
        count(&v, "codes", "OK") + count(&v, "codes", "INVALID_ARGUMENT"),
        300,
        "{v}"
    );
    let failed = proxy.metric(
        "fleetlb_grpc_calls_total",
        &[("grpc_status", "14"), ("source", "instance")],
    );
    assert_eq!(
        state(&proxy, "s0"),
        EndpointState::Ejected,
        "after {failed} UNAVAILABLE"
    );
    // The caller's mistakes are not the instance's: s1 stays in and keeps its share.
    assert_eq!(state(&proxy, "s1"), EndpointState::Healthy);
    let s1 = count(&v, "codes", "INVALID_ARGUMENT");
    assert!(s1 >= 50, "s1 answered {s1} of 300 calls: {v}");
    assert!(failed >= 1.0);
    assert_eq!(
        proxy.metric("fleetlb_ejections_total", &[("reason", "unavailable")]),
        1.0
    );
    assert!(proxy.metric("fleetlb_retries_total", &[]) >= failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_deadline_is_honoured_and_passed_on() {
    let (mut servers, proxy) = behind_proxy(1).await;
    // The instance is told the time the caller has left.
    let v = calls(&proxy, 1, &["--deadline", "5"]).await;
    let left: i64 = v["trailers"]["x-deadline-ms"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (3000..=5100).contains(&left),
        "instance was given {left} ms: {v}"
    );
    // Past the deadline the caller hears DEADLINE_EXCEEDED, not a 10 s wait.
    servers.set(0, "hang").await;
    let v = calls(&proxy, 2, &["--deadline", "0.3"]).await;
    assert_eq!(count(&v, "codes", "DEADLINE_EXCEEDED"), 2, "{v}");
    for ms in v["elapsed_ms"].as_array().unwrap() {
        assert!(ms.as_u64().unwrap() < 5000, "{v}");
    }
    // The caller's short deadline is not the instance failing.
    assert_eq!(state(&proxy, "s0"), EndpointState::Healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_health_service_decides_who_gets_calls() {
    let (mut servers, proxy) = behind_proxy(2).await;
    servers.set(1, "notserving").await;
    proxy.wait_unhealthy("s1").await;
    let v = calls(&proxy, 50, &[]).await;
    assert_eq!(count(&v, "by_instance", "s0"), 50, "{v}");
    servers.set(1, "ok").await;
    proxy.wait_healthy(2).await;
    let v = calls(&proxy, 200, &["--concurrency", "2"]).await;
    assert!(count(&v, "by_instance", "s1") > 20, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleetlbs_own_answers_are_grpc_statuses() {
    // A route whose only instance never listened: no healthy endpoint.
    let dead = EndpointConfig::new("dead", ([127, 0, 0, 1], 9).into());
    let proxy = Proxy::start(ProxyConfig::default(), vec![grpc_route(vec![dead])]).await;
    let v = calls(&proxy, 2, &["--deadline", "5"]).await;
    assert_eq!(count(&v, "codes", "UNAVAILABLE"), 2, "{v}");
    assert_eq!(v["details"][0], "no healthy endpoint", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_http1_gets_a_400_that_says_http2() {
    let (_servers, proxy) = behind_proxy(1).await;
    let answer = exchange(
        proxy.addr,
        b"POST /fleetlb.demo.Echo/Say HTTP/1.1\r\nhost: x\r\ncontent-type: application/grpc\r\n\
          te: trailers\r\ncontent-length: 5\r\n\r\n\x00\x00\x00\x00\x00",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("gRPC requires HTTP/2"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nowhere_else_to_go_the_instances_own_unavailable_reaches_the_caller() {
    let (mut servers, proxy) = behind_proxy(1).await;
    servers.set(0, "unavailable").await;
    let v = calls(&proxy, 3, &[]).await;
    assert_eq!(count(&v, "codes", "UNAVAILABLE"), 3, "{v}");
    // Its own message, not one fleetlb made up.
    assert_eq!(v["details"][0], "going away", "{v}");
    // A cluster of one is never left with nothing: no ejection.
    assert_eq!(state(&proxy, "s0"), EndpointState::Healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stream_stays_in_flight_but_leaves_the_autoscalers_load() {
    let (mut servers, proxy) = behind_proxy_with(1, &[], ProxyConfig::default(), |r| {
        r.request_timeout = Duration::from_millis(500);
    })
    .await;
    servers.set(0, "slow").await;
    // 40 messages 60 ms apart: a stream of 2.4 s, past the route's 0.5 s head timeout.
    let addr = proxy.addr.to_string();
    let stream = tokio::spawn(async move {
        Command::new("python3")
            .args([PEER, "call", &addr, "1", "--stream", "40"])
            .output()
            .await
            .unwrap()
    });
    let dp = proxy.dataplane.clone();
    let inflight = || dp.snapshot()[0].endpoints[0].inflight;
    let load = || dp.load()[0].inflight;
    eventually("the stream in flight", || inflight() == 1).await;
    assert_eq!(load(), 1, "a young stream is load");
    eventually("the stream past the head timeout leaves the load", || {
        inflight() == 1 && load() == 0
    })
    .await;
    let out = stream.await.unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(count(&v, "codes", "OK"), 1, "{v}");
    assert_eq!(v["messages"].as_array().unwrap().len(), 40, "{v}");
    eventually("nothing in flight after", || inflight() == 0 && load() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_silent_past_the_routes_body_timeout_ends_unavailable() {
    let (mut servers, proxy) = behind_proxy_with(1, &[], ProxyConfig::default(), |r| {
        r.body_timeout = Some(Duration::from_secs(1));
    })
    .await;
    servers.set(0, "stall").await;
    let v = calls(&proxy, 1, &["--stream", "3"]).await;
    assert_eq!(count(&v, "codes", "UNAVAILABLE"), 1, "{v}");
    assert_eq!(v["messages"].as_array().unwrap().len(), 1, "{v}");
    let ms = v["elapsed_ms"][0].as_u64().unwrap();
    assert!(
        ms < 9000,
        "ended after {ms} ms, not at the 1 s body timeout: {v}"
    );
}

/// An h2c-only server (hyper, prior knowledge): answers `/health` and, elsewhere, the HTTP
/// version it was asked in, counting the connections it accepted.
async fn h2c_server() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = std::sync::Arc::new(AtomicU64::new(0));
    let counted = conns.clone();
    tokio::spawn(async move {
        loop {
            let Ok((io, _)) = listener.accept().await else {
                return;
            };
            counted.fetch_add(1, Relaxed);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let body = format!("{:?} {}", req.version(), req.uri().path());
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                        .await;
            });
        }
    });
    (addr, conns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_cluster_serves_http1_clients_over_shared_h2c_connections() {
    let (addr, conns) = h2c_server().await;
    let mut route = RouteConfig::new("h2", "/c", vec![EndpointConfig::new("h2", addr)]);
    route.protocol = Protocol::Http2;
    route.health = fast_health();
    let proxy = Proxy::start(ProxyConfig::default(), vec![route]).await;
    // Its health check went over HTTP/2 too (the server speaks nothing else).
    proxy.wait_healthy(1).await;
    let c = client();
    let url = proxy.url("/c/x");
    let all = futures::future::join_all((0..50).map(|_| get(&c, &url))).await;
    for r in &all {
        assert_eq!(r.as_ref().unwrap(), &(200, "HTTP/2.0 /c/x".to_string()));
    }
    // 50 requests, many at once, as streams on a few connections (one per proxy runtime, plus
    // the probes').
    let n = conns.load(std::sync::atomic::Ordering::Relaxed);
    assert!(n <= 4, "{n} connections for 50 requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_uploading_client_is_not_the_instances_slowness() {
    let (_servers, proxy) = behind_proxy_with(1, &[], ProxyConfig::default(), |r| {
        r.request_timeout = Duration::from_secs(1);
    })
    .await;
    // Client-streaming calls of 3 messages 0.7 s apart: the instance answers once the last
    // came, 1.4 s after the call began, past the route's 1 s head timeout counted from there.
    let v = calls(
        &proxy,
        3,
        &["--upload", "3", "--gap", "0.7", "--concurrency", "3"],
    )
    .await;
    assert_eq!(count(&v, "codes", "OK"), 3, "{v}");
    assert_eq!(v["messages"][0], "3", "{v}");
    assert_eq!(state(&proxy, "s0"), EndpointState::Healthy);
    let snap = proxy.dataplane.snapshot();
    assert_eq!(
        snap[0].endpoints[0].failures, 0,
        "the client's pace counted against it"
    );
    assert!(
        snap[0].endpoints[0].latency_ms < 500.0,
        "the client's pace became its latency: {} ms",
        snap[0].endpoints[0].latency_ms
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_not_a_grpc_call_never_reaches_a_grpc_instance() {
    let (_servers, proxy) = behind_proxy(2).await;
    let c = client();
    for _ in 0..12 {
        let (status, body) = get(&c, &proxy.url("/fleetlb.demo.Echo/Say")).await.unwrap();
        assert_eq!(status, 415, "{body}");
        assert!(body.contains("gRPC only"), "{body}");
    }
    for s in proxy.dataplane.snapshot()[0].endpoints.iter() {
        assert_eq!(
            (s.state, s.failures, s.selections),
            (EndpointState::Healthy, 0, 0)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instances_stream_limit_opens_more_connections_instead_of_queueing() {
    // At most 4 streams per connection, 60 ms a call, 40 calls at once.
    let (mut servers, proxy) = behind_proxy_with(1, &["4"], ProxyConfig::default(), |_| {}).await;
    servers.set(0, "slow").await;
    let v = calls(&proxy, 120, &["--concurrency", "40", "--deadline", "5"]).await;
    assert_eq!(count(&v, "codes", "OK"), 120, "{v}");
    assert_eq!(proxy.dataplane.snapshot()[0].endpoints[0].failures, 0);
    let connections = servers.connections(0).await;
    assert!(
        connections > 1,
        "the calls queued on {connections} connection(s) instead of opening more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_allows_one_stream_per_connection_still_serves_calls_side_by_side() {
    // SETTINGS_MAX_CONCURRENT_STREAMS = 1, the same value as the proxy's own limit before an
    // instance's SETTINGS arrive: the pool must still learn it (the health checks' connection
    // is already open), and run 20 calls at once on 20 connections, not one after another.
    let (mut servers, proxy) = behind_proxy_with(1, &["1"], ProxyConfig::default(), |_| {}).await;
    servers.set(0, "slow").await;
    let v = calls(&proxy, 60, &["--concurrency", "20", "--deadline", "20"]).await;
    assert_eq!(count(&v, "codes", "OK"), 60, "{v}");
    let most = servers.most_at_once(0).await;
    assert!(
        most >= 10,
        "the instance served at most {most} of 20 concurrent calls at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_client_connection_hears_resource_exhausted() {
    let mut cfg = ProxyConfig::default();
    cfg.limits.max_upstream_per_connection = 3;
    let (mut servers, proxy) = behind_proxy_with(1, &[], cfg, |_| {}).await;
    // Three calls hang on the instance; the rest wait for the connection's slots, and past
    // the wait hear RESOURCE_EXHAUSTED as a gRPC status, not an HTTP 503.
    servers.set(0, "hang").await;
    let v = calls(&proxy, 20, &["--concurrency", "20", "--deadline", "4"]).await;
    assert!(count(&v, "codes", "RESOURCE_EXHAUSTED") > 0, "{v}");
    assert_eq!(
        count(&v, "codes", "DEADLINE_EXCEEDED") + count(&v, "codes", "RESOURCE_EXHAUSTED"),
        20,
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_hangs_meets_the_routes_head_timeout() {
    let (mut servers, proxy) = behind_proxy_with(1, &[], ProxyConfig::default(), |r| {
        r.request_timeout = Duration::from_secs(1);
    })
    .await;
    servers.set(0, "hang").await;
    // No deadline of the caller's: the route's 1 s, not the 60 s client-body timeout or the
    // instance's 10 s.
    let v = calls(&proxy, 1, &[]).await;
    assert_eq!(count(&v, "codes", "DEADLINE_EXCEEDED"), 1, "{v}");
    let ms = v["elapsed_ms"][0].as_u64().unwrap();
    assert!(ms < 5000, "answered after {ms} ms: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_slow_to_read_is_not_the_instances_silence() {
    use http_body_util::BodyExt;
    let (_servers, proxy) = behind_proxy_with(1, &[], ProxyConfig::default(), |r| {
        r.body_timeout = Some(Duration::from_secs(1));
    })
    .await;
    // An HTTP/2 client whose window takes about one message: fleetlb cannot pass the answer
    // on while it does not read.
    let io = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(16)
            .handshake::<_, http_body_util::Full<bytes::Bytes>>(hyper_util::rt::TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{}/fleetlb.demo.Echo/Count", proxy.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"\x00\x00\x00\x00\x02\x08\x05",
        )))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    // Away for 2.5 s, past the route's 1 s body timeout, then back.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut data = first.into_data().unwrap().len();
    let mut status = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        if let Some(d) = frame.data_ref() {
            data += d.len();
        } else if let Some(t) = frame.trailers_ref() {
            status = t.get("grpc-status").cloned();
        }
    }
    assert_eq!(status.as_ref().map(|s| s.as_bytes()), Some(&b"0"[..]));
    assert_eq!(
        data,
        5 * 9,
        "five messages of 4 bytes, each with its 5-byte prefix"
    );
}

/// An h2 server (the h2 crate) that answers `/health`; on its first connection that carries
/// requests it holds them, and at the 5th ends the connection: with a GOAWAY of
/// ENHANCE_YOUR_CALM (`calm`, as an h2 server's rapid-reset guard does) or by closing the
/// socket. Later connections are answered at once. Counts the connections it ended.
async fn ending_h2_server(
    calm: bool,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ended = std::sync::Arc::new(AtomicU64::new(0));
    let counted = ended.clone();
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(io).await else {
                    return;
                };
                let mut held = Vec::new();
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    if req.uri().path() == "/health" || counted.load(Relaxed) > 0 {
                        let _ = respond.send_response(http::Response::new(()), true);
                        continue;
                    }
                    held.push(respond);
                    if held.len() == 5 {
                        counted.fetch_add(1, Relaxed);
                        if calm {
                            conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                            while conn.accept().await.is_some() {}
                        }
                        return;
                    }
                }
            });
        }
    });
    (addr, ended)
}

/// 10 requests at once through an HTTP/2 route to `addr`: their statuses, and the endpoint's
/// failures and ejections.
async fn ten_at_once(addr: std::net::SocketAddr) -> (Vec<u16>, u64, u32) {
    let mut route = RouteConfig::new("h2", "/c", vec![EndpointConfig::new("h2", addr)]);
    route.protocol = Protocol::Http2;
    route.health = fast_health();
    let proxy = Proxy::start(ProxyConfig::default(), vec![route]).await;
    proxy.wait_healthy(1).await;
    let c = client();
    let url = proxy.url("/c/x");
    let all = futures::future::join_all((0..10).map(|_| get(&c, &url))).await;
    let statuses = all.into_iter().map(|r| r.unwrap().0).collect();
    let ep = proxy.dataplane.snapshot()[0].endpoints[0].clone();
    (statuses, ep.failures, ep.ejections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_calming_the_proxy_down_is_not_blamed_for_it() {
    // The instance's own guard against resets (the proxy's clients', passed on) closing the
    // connection is not the instance failing: nothing counted, nobody ejected.
    let (addr, ended) = ending_h2_server(true).await;
    let (statuses, failures, ejections) = ten_at_once(addr).await;
    assert_eq!(ended.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert!(statuses.contains(&502), "{statuses:?}");
    assert_eq!((failures, ejections), (0, 0), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_connection_counts_once_however_many_streams_it_carried() {
    let (addr, ended) = ending_h2_server(false).await;
    let (statuses, failures, _) = ten_at_once(addr).await;
    assert_eq!(ended.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert!(statuses.contains(&502), "{statuses:?}");
    assert_eq!(failures, 1, "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_exhausted_does_not_make_an_instance_look_slow() {
    // What an instance answers to a caller's oversized message: the caller's doing, which
    // must not cost the instance its place (a failure penalty is a second of latency).
    let (mut servers, proxy) = behind_proxy(2).await;
    servers.set(0, "exhausted").await;
    let v = calls(&proxy, 60, &[]).await;
    assert!(count(&v, "codes", "RESOURCE_EXHAUSTED") > 0, "{v}");
    let snap = proxy.dataplane.snapshot();
    let s0 = snap[0].endpoints.iter().find(|e| e.id == "s0").unwrap();
    let penalty = ProxyConfig::default().failure_penalty.as_secs_f64() * 1000.0;
    assert!(
        s0.latency_ms < penalty / 10.0,
        "s0's estimate is {} ms",
        s0.latency_ms
    );
    assert_eq!((s0.state, s0.failures), (EndpointState::Healthy, 0));
}
