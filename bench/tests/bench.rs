//! `fleetlb bench` against real local servers with known behaviour.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use fleetlb_bench::{BenchConfig, run};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

fn config(target: String) -> BenchConfig {
    BenchConfig {
        target,
        paths: vec!["/x".into()],
        requests: Some(200),
        concurrency: 10,
        rate: None,
        duration: None,
        then: Vec::new(),
        keepalive: true,
        timeout: Duration::from_secs(5),
        out: None,
        progress: false,
    }
}

/// An HTTP server answering `{"instance_id":"i-N"}` (N = connection parity) after `delay`;
/// request number `stall_at` (if any) holds every request for `stall` instead.
async fn server(delay: Duration, stall_at: Option<u64>, stall: Duration) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(tokio::sync::Mutex::new(()));
    let conns = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let id = conns.fetch_add(1, Relaxed) % 2;
            let (count, gate) = (count.clone(), gate.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let (count, gate) = (count.clone(), gate.clone());
                    async move {
                        let n = count.fetch_add(1, Relaxed);
                        if Some(n) == stall_at {
                            let _g = gate.lock().await;
                            tokio::time::sleep(stall).await;
                        } else {
                            drop(gate.lock().await);
                        }
                        tokio::time::sleep(delay).await;
                        let body = format!("{{\"instance_id\":\"i-{id}\"}}");
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latencies_are_never_below_the_injected_delay_and_instances_are_counted() {
    let target = server(Duration::from_millis(20), None, Duration::ZERO).await;
    let s = run(&config(target)).await.unwrap();
    let p = &s.paths[0];
    assert_eq!((p.count, p.ok, p.failed), (200, 200, 0));
    // HdrHistogram keeps 3 significant digits: 20 ms reads as at least 19.98 ms.
    assert!(
        p.latency_ms.p50 >= 19.98 && p.latency_ms.mean >= 19.98,
        "{:?}",
        p.latency_ms
    );
    assert!(p.latency_ms.max >= p.latency_ms.p999 && p.latency_ms.p999 >= p.latency_ms.p99);
    assert_eq!(p.instances.len(), 2, "{:?}", p.instances);
    assert_eq!(p.instances.iter().map(|i| i.count).sum::<u64>(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_classified() {
    // A refused port.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let s = run(&BenchConfig {
        requests: Some(20),
        ..config(closed)
    })
    .await
    .unwrap();
    assert_eq!(
        s.paths[0].errors.get("connect"),
        Some(&20),
        "{:?}",
        s.paths[0].errors
    );

    // A server that reads the request and closes the connection.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let resetting = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            drop(s);
        }
    });
    let s = run(&BenchConfig {
        requests: Some(20),
        ..config(resetting)
    })
    .await
    .unwrap();
    assert_eq!(
        s.paths[0].errors.get("reset"),
        Some(&20),
        "{:?}",
        s.paths[0].errors
    );

    // A server that never answers: every request ends at the timeout.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stalling = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            held.push(s);
        }
    });
    let cfg = BenchConfig {
        requests: Some(10),
        timeout: Duration::from_millis(200),
        ..config(stalling)
    };
    let s = run(&cfg).await.unwrap();
    assert_eq!(
        s.paths[0].errors.get("timeout"),
        Some(&10),
        "{:?}",
        s.paths[0].errors
    );
    assert!(s.error_rate() > 0.99);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_reports_a_server_pause_that_closed_loop_hides() {
    // Request 50 freezes the whole server for 500 ms.
    let pause = Duration::from_millis(500);
    let closed_target = server(Duration::ZERO, Some(50), pause).await;
    let closed = run(&BenchConfig {
        requests: Some(300),
        concurrency: 1,
        ..config(closed_target)
    })
    .await
    .unwrap();
    let open_target = server(Duration::ZERO, Some(50), pause).await;
    let open = run(&BenchConfig {
        requests: Some(300),
        concurrency: 1,
        rate: Some(200.0),
        ..config(open_target)
    })
    .await
    .unwrap();
    let slow = |s: &fleetlb_bench::Summary| s.paths[0].latency_ms.p90;
    // Closed loop: one slow request of 300, the p90 stays small.
    assert!(slow(&closed) < 250.0, "closed loop p90 {}", slow(&closed));
    // Open loop: every request scheduled during the pause waited for it (~100 of 300).
    assert!(
        slow(&open) >= 250.0,
        "open loop p90 {} hides the pause",
        slow(&open)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_dir_gets_one_csv_row_per_request_json_and_charts() {
    let target = server(Duration::from_millis(1), None, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = BenchConfig {
        paths: vec!["/cluster1".into(), "/cluster2".into()],
        requests: Some(150),
        out: Some(dir.path().to_path_buf()),
        ..config(target)
    };
    run(&cfg).await.unwrap();
    for stem in ["cluster1", "cluster2"] {
        let csv = std::fs::read_to_string(dir.path().join(format!("{stem}.csv"))).unwrap();
        let mut lines = csv.lines();
        assert_eq!(
            lines.next(),
            Some("seq,start_ms,latency_ms,status,error,instance")
        );
        assert_eq!(lines.count(), 150);
    }
    let summary: fleetlb_bench::Summary =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary.paths.len(), 2);
    for png in [
        "latency-distribution.png",
        "latency-over-time-cluster1.png",
        "latency-over-time-cluster2.png",
        "fleet-over-time-cluster1.png",
        "requests-per-instance.png",
    ] {
        let bytes = std::fs::read(dir.path().join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert!(
            bytes.len() > 1000 && bytes.starts_with(b"\x89PNG"),
            "{png} is not a PNG"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_run_back_to_back_as_one_run_and_the_timeline_follows_them() {
    let target = server(Duration::from_millis(1), None, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = BenchConfig {
        rate: Some(40.0),
        duration: Some(Duration::from_secs(1)),
        then: vec![
            (200.0, Duration::from_secs(1)),
            (40.0, Duration::from_secs(1)),
        ],
        requests: None,
        concurrency: 8,
        out: Some(dir.path().to_path_buf()),
        ..config(target)
    };
    let summary = run(&cfg).await.unwrap();
    assert_eq!(summary.paths[0].count, 40 + 200 + 40);
    assert_eq!(summary.paths[0].failed, 0);
    let csv = std::fs::read_to_string(dir.path().join("timeline-x.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("second,requests,errors,instances,p50_ms,p99_ms")
    );
    let rows: Vec<Vec<f64>> = lines
        .map(|l| l.split(',').map(|x| x.parse().unwrap()).collect())
        .collect();
    // Every request in exactly one second, none failed; the first second is the first step
    // (the second starts after its last answer); the busiest second is the 200/s step.
    assert_eq!(rows.iter().map(|r| r[1]).sum::<f64>(), 280.0);
    assert_eq!(rows.iter().map(|r| r[2]).sum::<f64>(), 0.0);
    assert_eq!(rows[0][1], 40.0);
    assert!(
        rows.iter().map(|r| r[1]).fold(0.0, f64::max) >= 100.0,
        "{csv}"
    );
    // The server's two instances answered in the first second.
    assert_eq!(rows[0][3], 2.0, "{csv}");
    assert!(rows.iter().all(|r| r[5] >= r[4]), "p99 >= p50: {csv}");
}

/// An instant HTTP server that notes when each request arrived.
async fn stamping_server() -> (String, Arc<std::sync::Mutex<Vec<tokio::time::Instant>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let arrivals = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = arrivals.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    seen.lock().unwrap().push(tokio::time::Instant::now());
                    async { Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::new()))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), arrivals)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_sends_each_request_at_its_own_time_not_in_millisecond_bursts() {
    // 5000 req/s: one request every 200 µs. Paced by a 1 ms timer they would leave five at a
    // time, microseconds apart, each up to 1 ms late (and that lateness counted as latency).
    // A millisecond timer bunches every run; a 2-core machine busy with the other tests can
    // stall the generator (which then catches up in a burst) in one run now and then. So: up to
    // three runs, and one that arrives evenly paced passes.
    let mut medians = Vec::new();
    for _ in 0..3 {
        let (target, arrivals) = stamping_server().await;
        let cfg = BenchConfig {
            requests: Some(1000),
            concurrency: 32,
            rate: Some(5000.0),
            ..config(target)
        };
        let run = fleetlb_bench::load::run_path(&cfg, "/x", None).await;
        assert_eq!(run.records.len(), 1000);
        let mut at = arrivals.lock().unwrap().clone();
        at.sort();
        let mut gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        gaps.sort();
        let median = gaps[gaps.len() / 2];
        if median >= Duration::from_micros(100) {
            return;
        }
        medians.push(median);
    }
    panic!("requests arrive bunched: median gaps {medians:?}, want about 200 µs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_over_several_threads_sends_every_request_exactly_once() {
    // Above 25 000 req/s the load is split over threads (as many as there are cores): between
    // them, every request number is sent once, none past the count or the duration.
    for (requests, duration) in [(Some(3000), None), (None, Some(Duration::from_millis(100)))] {
        let (target, arrivals) = stamping_server().await;
        let cfg = BenchConfig {
            requests,
            duration,
            concurrency: 64,
            rate: Some(30_000.0),
            ..config(target)
        };
        let run = fleetlb_bench::load::run_path(&cfg, "/x", None).await;
        let seqs: Vec<u64> = run.records.iter().map(|r| r.seq).collect();
        assert_eq!(
            seqs,
            (0..3000).collect::<Vec<_>>(),
            "{requests:?} {duration:?}"
        );
        assert!(run.records.iter().all(|r| r.outcome == Ok(200)));
        assert_eq!(arrivals.lock().unwrap().len(), 3000);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_says_when_too_few_connections_made_requests_wait() {
    // 100 req/s to a 20 ms server: one connection can carry 50 req/s, so requests queue for
    // it and leave ever later; with 8 connections each leaves on time.
    let target = server(Duration::from_millis(20), None, Duration::ZERO).await;
    let run = |concurrency| {
        let target = target.clone();
        async move {
            run(&BenchConfig {
                requests: Some(60),
                concurrency,
                rate: Some(100.0),
                ..config(target)
            })
            .await
            .unwrap()
        }
    };
    let starved = run(1).await;
    let enough = run(8).await;
    let lag = |s: &fleetlb_bench::Summary| s.paths[0].send_lag_ms.clone().unwrap();
    // 60 requests over 0.6 s, one at a time at 20 ms: the last leaves ~0.6 s late.
    assert!(lag(&starved).max >= 400.0, "{:?}", lag(&starved));
    assert!(
        lag(&enough).p99 < lag(&starved).p50,
        "{:?} vs {:?}",
        lag(&enough),
        lag(&starved)
    );
    let table = fleetlb_bench::report::table(&starved);
    assert!(table.contains("after their scheduled time"), "{table}");
}
