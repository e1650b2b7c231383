//! The access log as a user reads it: one JSON line per request with what happened, lines for
//! fleetlb's own answers, sampling that keeps errors, and a writer that falls behind without
//! ever holding up a request. Real upstreams on 127.0.0.1, lines read back as JSON.

mod support;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use fleetlb_dataplane::ProxyConfig;
use fleetlb_dataplane::access_log::AccessLog;
use support::*;

#[tokio::test]
async fn a_proxied_request_is_one_line_with_what_happened() {
    let (lines, cfg) = logged(1.0);
    let (up, proxy) = one_healthy(cfg).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let raw = format!(
        "POST /c/items?x=1 HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: probe/1\r\nX-Request-Id: abc-123\r\ntraceparent: 00-{trace}-00f067aa0ba902b7-01\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    );
    let answer = exchange(proxy.addr, raw.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body_len = answer.split("\r\n\r\n").nth(1).unwrap().len() as u64;
    let line = lines.wait(1).await.remove(0);

    assert_eq!(line["method"], "POST");
    assert_eq!(line["host"], "shop.example");
    assert_eq!(line["path"], "/c/items?x=1");
    assert_eq!(line["protocol"], "HTTP/1.1");
    assert_eq!(line["status"], 200);
    assert_eq!(line["bytes_in"], 5);
    assert_eq!(line["bytes_out"], body_len);
    assert_eq!(line["cluster"], "c");
    assert_eq!(line["endpoint"], up.addr.to_string());
    assert_eq!(line["instance_id"], up.name);
    assert_eq!(line["tries"], 1);
    assert_eq!(line["complete"], true);
    assert_eq!(line["request_id"], "abc-123");
    assert_eq!(line["trace_id"], trace);
    assert_eq!(line["user_agent"], "probe/1");
    assert!(line.get("reason").is_none(), "{line}");
    assert!(line.get("tls_version").is_none(), "{line}");
    assert!(
        line["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{line}"
    );
    assert!(line["time"].as_str().unwrap().ends_with('Z'), "{line}");
    assert!(line["upstream_head_ms"].as_f64().is_some(), "{line}");
    assert!(
        line["duration_ms"].as_f64().unwrap() >= line["upstream_head_ms"].as_f64().unwrap(),
        "{line}"
    );
}

#[tokio::test]
async fn fleetlbs_own_answers_are_logged_with_their_reason() {
    let (lines, cfg) = logged(1.0);
    let (mut up, proxy) = one_healthy(cfg).await;
    let c = client();
    // No route: 404.
    let (status, _) = get(&c, &proxy.url("/elsewhere")).await.unwrap();
    assert_eq!(status, 404);
    // The only endpoint gone: 502 or 503, said by fleetlb.
    up.kill();
    proxy.wait_unhealthy(&up.name).await;
    let (status, _) = get(&c, &proxy.url("/c/x")).await.unwrap();
    assert!(status == 502 || status == 503, "{status}");

    let got = lines.wait(2).await;
    let no_route = got.iter().find(|l| l["status"] == 404).unwrap();
    assert_eq!(no_route["reason"], "no_route");
    assert_eq!(no_route["path"], "/elsewhere");
    assert!(no_route.get("cluster").is_none(), "{no_route}");
    let down = got.iter().find(|l| l["status"] != 404).unwrap();
    assert_eq!(down["status"], status);
    let reason = down["reason"].as_str().unwrap();
    assert!(
        ["no_healthy_endpoint", "connect"].contains(&reason),
        "{down}"
    );
    assert_eq!(down["cluster"], "c");
    // A request routed to a cluster has a trace id, made by fleetlb when the client sent
    // none.
    let id = down["trace_id"].as_str().unwrap();
    assert_eq!(id.len(), 32, "{down}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{down}");
}

#[tokio::test]
async fn sampling_keeps_every_error_and_a_share_of_the_rest() {
    let (lines, cfg) = logged(0.0);
    let (up, proxy) = one_healthy(cfg).await;
    let c = client();
    for _ in 0..20 {
        assert_eq!(get(&c, &proxy.url("/c/ok")).await.unwrap().0, 200);
    }
    assert_eq!(get(&c, &proxy.url("/nowhere")).await.unwrap().0, 404);
    // A backend's own 5xx is kept too.
    up.status.store(500, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(get(&c, &proxy.url("/c/fails")).await.unwrap().0, 500);
    let got = lines.wait(2).await;
    // The 404 and the 500 were sent after the 200s: had any of those been kept, it would come
    // first.
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0]["status"], 404);
    assert_eq!(got[1]["status"], 500);
    assert!(got[1].get("reason").is_none(), "{}", got[1]);
}

/// A writer that never returns (a pipe nobody reads); it counts the lines it was handed.
struct Stuck(Arc<AtomicUsize>);

impl Write for Stuck {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .fetch_add(buf.iter().filter(|b| **b == b'\n').count(), Relaxed);
        loop {
            std::thread::park();
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_stuck_log_writer_delays_no_request_and_its_lines_are_counted_as_dropped() {
    let stuck = Arc::new(AtomicUsize::new(0));
    let log = AccessLog::to_writer(Box::new(Stuck(stuck.clone())), 1.0, 4).unwrap();
    let cfg = ProxyConfig {
        access_log: Some(log),
        ..ProxyConfig::default()
    };
    let (_up, proxy) = one_healthy(cfg).await;
    let c = client();
    // Had a request waited for room in the log, these would hang (the test's deadline).
    tokio::time::timeout(DEADLINE, async {
        for _ in 0..40 {
            assert_eq!(get(&c, &proxy.url("/c/x")).await.unwrap().0, 200);
        }
    })
    .await
    .expect("requests waited for the access log");
    // The lines the writer took are stuck in it, at most 4 wait in the channel: every other
    // one was dropped and counted.
    eventually("dropped lines counted", || {
        let taken = stuck.load(Relaxed);
        let dropped = proxy.metric("fleetlb_access_log_dropped_total", &[]);
        taken > 0 && dropped >= 1.0 && dropped >= 40.0 - 4.0 - taken as f64
    })
    .await;
}
