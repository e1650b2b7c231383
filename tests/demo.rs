//! The whole loop on one machine, as a new user runs it: the real `fleetlb demo` process, real
//! backend processes, real HTTP on loopback.

mod support;

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

fn demo_clusters() -> Vec<(&'static str, String)> {
    vec![
        ("cluster1.yaml", example("cluster1.yaml")),
        ("cluster2.yaml", example("cluster2.yaml")),
    ]
}

#[test]
fn demo_serves_scales_heals_deletes_and_stops_cleanly() {
    let mut f = Fleetlb::demo(&demo_clusters());

    // Both routes answer 200 from at least 3 distinct instances each.
    for path in ["/cluster1", "/cluster2"] {
        let ids = eventually(&format!("{path} served by >= 3 instances"), || {
            f.distinct_instances(path, 40).filter(|ids| ids.len() >= 3)
        });
        assert!(ids.iter().all(|id| id.starts_with("i-")), "{ids:?}");
    }
    assert_eq!(backends_of(f.pid(), Some("cluster1")).len(), 4);

    // Scale cluster1 from 4 to 2 by editing its file.
    f.write(
        "cluster1.yaml",
        &example("cluster1.yaml").replace("replicas: 4", "replicas: 2"),
    );
    eventually("cluster1 down to 2 backend processes", || {
        (backends_of(f.pid(), Some("cluster1")).len() == 2).then_some(())
    });
    let ids = f
        .distinct_instances("/cluster1", 40)
        .expect("cluster1 still serves");
    assert!(
        ids.len() <= 2,
        "retired instances still get traffic: {ids:?}"
    );

    // Kill one cluster2 backend: it leaves the ranked set, clients see no error.
    let (victim_pid, victim_id) = a_backend_of(f.pid(), "cluster2");
    assert!(
        Command::new("kill")
            .args(["-9", &victim_pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let mut failures = 0;
    for _ in 0..200 {
        match get(f.proxy, "/cluster2") {
            Some(r) if r.status == 200 => {}
            _ => failures += 1,
        }
    }
    assert_eq!(failures, 0, "requests failed after a backend was killed");
    eventually("killed instance leaves the ranked endpoint set", || {
        let st = f.status();
        let c2 = st["clusters"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == "cluster2")?
            .clone();
        let eps: Vec<String> = c2["status"]["endpoints"]
            .as_array()?
            .iter()
            .filter_map(|e| e["id"].as_str().map(String::from))
            .collect();
        (!eps.contains(&victim_id) && eps.len() == 4).then_some(())
    });

    // Delete cluster1's file: its instances terminate and its route answers 404.
    f.remove("cluster1.yaml");
    eventually("cluster1 instances terminated", || {
        backends_of(f.pid(), Some("cluster1"))
            .is_empty()
            .then_some(())
    });
    eventually("/cluster1 answers 404", || {
        get(f.proxy, "/cluster1").filter(|r| r.status == 404)
    });
    assert_eq!(get(f.proxy, "/cluster2").map(|r| r.status), Some(200));

    // SIGTERM: fleetlb exits 0 and leaves no backend process behind.
    let pids: Vec<u32> = backends_of(f.pid(), None)
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert!(!pids.is_empty());
    f.signal("-TERM");
    let status = eventually("fleetlb exits after SIGTERM", || {
        f.child.try_wait().ok().flatten()
    });
    assert!(status.success(), "fleetlb exited with {status}");
    eventually("no backend process outlives fleetlb", || {
        pids.iter().all(|p| !alive(*p)).then_some(())
    });
    let log = f.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn backends_die_with_fleetlb_even_on_sigkill() {
    let f = Fleetlb::demo(&demo_clusters());
    let pids = eventually("8 backends running", || {
        let b = backends_of(f.pid(), None);
        (b.len() == 8).then_some(b)
    });
    f.signal("-KILL");
    eventually("every backend exits once its parent is SIGKILLed", || {
        pids.iter().all(|(p, _)| !alive(*p)).then_some(())
    });
}

#[test]
fn invalid_specs_get_one_clear_line_each_and_valid_clusters_keep_serving() {
    let mut files = demo_clusters();
    let invalid_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/invalid");
    let mut invalid: Vec<String> = std::fs::read_dir(&invalid_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    invalid.sort();
    for name in &invalid {
        files.push((
            Box::leak(name.clone().into_boxed_str()),
            std::fs::read_to_string(invalid_dir.join(name)).unwrap(),
        ));
    }
    let f = Fleetlb::demo(&files);
    f.wait_both_clusters_serve("valid clusters serve next to invalid ones");

    let st = f.status();
    let errors: Vec<String> = st["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        errors.len(),
        invalid.len(),
        "one error per invalid file: {errors:#?}"
    );
    let expect = [
        ("bad-host.yaml", "spec.hosts[0]"),
        ("bad-instance-type.yaml", "spec.instanceType"),
        ("not-yaml.yaml", "invalid YAML"),
        (
            "replicas-out-of-range.yaml",
            "spec.replicas: 5000 is greater than the maximum of 1000",
        ),
        ("route-escapes.yaml", "spec.route"),
        (
            "timeout-above-interval.yaml",
            "spec.healthCheck.timeoutSeconds",
        ),
        ("two-providers.yaml", "spec.provider"),
        ("typo-field.yaml", "unknown field `replica`"),
    ];
    let log = f.log_text();
    for (file, field) in expect {
        let line = errors
            .iter()
            .find(|e| e.contains(file))
            .unwrap_or_else(|| panic!("no error for {file}: {errors:#?}"));
        assert!(
            line.contains(field),
            "{file}: expected {field:?} in {line:?}"
        );
        assert!(!line.contains('\n'), "error is not one line: {line:?}");
        assert_eq!(
            log.matches(file).count(),
            1,
            "{file} should be logged exactly once:\n{log}"
        );
    }
    let names: HashSet<&str> = st["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, HashSet::from(["cluster1", "cluster2"]));
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn a_rejected_edit_keeps_the_previous_spec_serving() {
    let f = Fleetlb::demo(&demo_clusters());
    eventually("cluster1 serves", || f.distinct_instances("/cluster1", 10));
    f.write(
        "cluster1.yaml",
        &example("cluster1.yaml").replace("replicas: 4", "replicas: -3"),
    );
    eventually("the rejected edit shows in /status", || {
        let st = f.status();
        let c1 = st["clusters"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == "cluster1")?
            .clone();
        c1["rejectedEdit"]
            .as_str()
            .filter(|e| e.contains("spec.replicas"))
            .map(String::from)
    });
    assert_eq!(
        backends_of(f.pid(), Some("cluster1")).len(),
        4,
        "an invalid edit changed the fleet"
    );
    assert_eq!(get(f.proxy, "/cluster1").map(|r| r.status), Some(200));
}

#[test]
fn metrics_pass_promtool_and_count_requests() {
    let f = Fleetlb::demo(&demo_clusters());
    eventually("cluster1 serves", || f.distinct_instances("/cluster1", 10));
    let _ = get(f.proxy, "/nowhere");
    let metrics = get(f.admin, "/metrics").expect("metrics answer");
    assert_eq!(metrics.status, 200);
    for name in [
        "fleetlb_requests_total{cluster=\"cluster1\",code_class=\"2xx\"}",
        "fleetlb_request_duration_seconds_bucket",
        "fleetlb_endpoints{cluster=\"cluster2\",state=\"healthy\"}",
        "fleetlb_endpoint_latency_seconds",
        "fleetlb_proxy_errors_total",
    ] {
        assert!(
            metrics.body.contains(name),
            "/metrics lacks {name}:\n{}",
            metrics.body
        );
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package `prometheus`; .ci/run installs it)");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), metrics.body.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn status_command_prints_a_table() {
    let f = Fleetlb::demo(&demo_clusters());
    eventually("both clusters ready", || {
        let st = f.status();
        let ready = st["clusters"]
            .as_array()?
            .iter()
            .all(|c| c["status"]["readyReplicas"] == 4);
        ready.then_some(())
    });
    let out = Command::new(env!("CARGO_BIN_EXE_fleetlb"))
        .args(["status", "--admin", &f.admin.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("READY"),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("cluster1") && l.contains("AllReplicasReady")),
        "{text}"
    );
}

/// Runs `fleetlb args`, which must exit 64 with one line on stderr; returns that line.
fn usage_error(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetlb"))
        .args(args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{args:?}");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    err
}

#[test]
fn bad_flags_exit_64_with_one_line() {
    for args in [
        &["--bogus"][..],
        &["demo", "--listen", "nope"],
        &["standalone"],
    ] {
        assert!(usage_error(args).starts_with("fleetlb: "));
    }
    // Values are checked by the command line itself, each naming its flag.
    for (args, says) in [
        (
            &["standalone", "--config", "/nonexistent/dir"][..],
            "not a directory",
        ),
        (&["demo", "--config", "/nonexistent/dir"], "not a directory"),
        (&["bench", "--path", "x"], "must be a path starting with /"),
        (
            &["bench", "--path", "/", "--rate", "0"],
            "between 0.001 and 10000000",
        ),
        (
            &["bench", "--path", "/", "--target", "ftp://x"],
            "must be an http:// URL",
        ),
        (
            &["bench", "--path", "/", "--max-error-rate", "2"],
            "between 0 and 1",
        ),
        (&["run", "--peers", "fleetlb-peers"], "must be host:port"),
        (&["run", "--peers", "a:9090,b:0"], "must be host:port"),
    ] {
        let err = usage_error(args);
        let flag = args[args.len() - 2];
        assert!(err.contains(flag) && err.contains(says), "{args:?}: {err}");
    }
    // clap's whole message, on one line: the argument it misses, the values it takes, the
    // flag meant.
    for (args, says) in [
        (&["standalone"][..], "--config"),
        (&["bench"], "--path"),
        (
            &["demo", "--tls-listen", "127.0.0.1:0", "--tls-cert", "a.crt"],
            "--tls-key",
        ),
        (
            &["--log-format", "yaml", "demo"],
            "possible values: text, json",
        ),
        (&["demo", "--lisen", "127.0.0.1:0"], "--listen"),
        (&["demo", "--listen", "localhost"], "--listen"),
    ] {
        let err = usage_error(args);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    for args in [
        &["run", "--proxy-threads", "9999"][..],
        &["run", "--identity"],
        // HTTPS needs a certificate and its key, and a certificate needs the listener.
        &["demo", "--tls-listen", "127.0.0.1:0"],
        &["demo", "--tls-cert", "a.crt", "--tls-key", "a.key"],
    ] {
        usage_error(args);
    }
    // A certificate that does not load stops the start, naming the file and why.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("a.key");
    std::fs::write(&key, "not a key").unwrap();
    let err = usage_error(&[
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        "/nonexistent/a.crt",
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    assert!(
        err.contains("--tls-cert") && err.contains("/nonexistent/a.crt"),
        "{err}"
    );
    let err = usage_error(&[
        "demo",
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        "a.crt",
        "--tls-cert",
        "b.crt",
        "--tls-key",
        "a.key",
    ]);
    assert!(err.contains("pairs"), "{err}");
}

#[test]
fn run_without_a_cluster_says_so_and_exits() {
    // No kubeconfig and not in a pod: configuration error, one line.
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fleetlb"))
        .args(["run", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", home.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("no Kubernetes configuration"), "{err}");

    // A kubeconfig whose API server does not answer: exits 69 (unavailable) and says why,
    // instead of serving without ever knowing a cluster.
    let (_dead, port) = dead_port();
    let kubeconfig = home.path().join("config");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"http://127.0.0.1:{port}\"}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fleetlb"))
        .args(["run", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the API server does not answer"), "{err}");
    // With --controller-id nothing is read before the BackendCluster list, which fails the
    // same way.
    let out = Command::new(env!("CARGO_BIN_EXE_fleetlb"))
        .args(["run", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--controller-id", "ctl-test"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot list BackendClusters"), "{err}");
}

#[test]
fn bench_gates_on_the_error_rate() {
    let (_dead, port) = dead_port();
    let target = format!("http://127.0.0.1:{port}");
    let run = |max: &str| {
        Command::new(env!("CARGO_BIN_EXE_fleetlb"))
            .args([
                "bench",
                "--target",
                &target,
                "--path",
                "/x",
                "-n",
                "5",
                "-c",
                "1",
                "--max-error-rate",
                max,
            ])
            .output()
            .unwrap()
    };
    let strict = run("0");
    assert_eq!(
        strict.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&strict.stderr)
    );
    assert!(String::from_utf8_lossy(&strict.stdout).contains("/x"));
    assert!(String::from_utf8_lossy(&strict.stderr).contains("error rate 1.0000 exceeds"));
    assert_eq!(run("1").status.code(), Some(0));
    let bad = Command::new(env!("CARGO_BIN_EXE_fleetlb"))
        .args(["bench", "--path", "x"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(64));
}

#[test]
fn the_original_experiment_in_one_command() {
    let f = Fleetlb::demo(&demo_clusters());
    eventually("both clusters ready", || {
        let st = f.status();
        st["clusters"]
            .as_array()?
            .iter()
            .all(|c| c["status"]["readyReplicas"] == 4)
            .then_some(())
    });
    let out_dir = f.dir.path().join("results");
    let out = Command::new(env!("CARGO_BIN_EXE_fleetlb"))
        .args([
            "bench",
            "--target",
            &format!("http://{}", f.proxy),
            "--path",
            "/cluster1",
            "--path",
            "/cluster2",
        ])
        .args(["-n", "1000", "-c", "100", "--out"])
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap())
            .unwrap();
    for p in summary["paths"].as_array().unwrap() {
        assert_eq!(p["ok"], 1000, "{p}");
        let instances = p["instances"].as_array().unwrap();
        assert_eq!(instances.len(), 4, "every instance of {} served", p["path"]);
        for i in instances {
            // Balanced: no instance took more than half of the requests.
            assert!(i["share"].as_f64().unwrap() < 0.5, "{i}");
        }
    }
}

#[test]
fn standalone_with_an_aws_cluster_requires_a_controller_id() {
    // No shared default identity: two installs in one account would take each other's
    // instances for orphans.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.yaml"), example("aws/cluster1.yaml")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fleetlb"))
        .args(["standalone", "--config"])
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env_remove("FLEETLB_CONTROLLER_ID")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("fleetlb: --controller-id is required"),
        "{err}"
    );
}

#[test]
fn a_retired_instance_keeps_serving_its_requests_and_goes_as_soon_as_they_end() {
    let slow = "apiVersion: fleetlb.dev/v1alpha1\nkind: BackendCluster\nmetadata:\n  name: slow\nspec:\n  route: /slow\n  replicas: 1\n  instanceType: t2.large\n  timeoutSeconds: 60\n  deregistrationDelaySeconds: 300\n  provider:\n    local:\n      latencyMs: 3000\n  healthCheck:\n    intervalSeconds: 1\n    timeoutSeconds: 1\n    healthyThreshold: 2\n    unhealthyThreshold: 2\n";
    let f = Fleetlb::demo(&[("slow.yaml", slow.to_string())]);
    let instance = |s: &serde_json::Value| -> Option<(String, String)> {
        let i = &s["clusters"][0]["status"]["instances"][0];
        Some((
            i["id"].as_str()?.to_string(),
            i["state"].as_str()?.to_string(),
        ))
    };
    eventually("slow is ready", || {
        let s = f.status();
        (s["clusters"][0]["status"]["readyReplicas"] == 1).then_some(())
    });
    let (id, _) = instance(&f.status()).unwrap();
    let proxy = f.proxy;
    let request = std::thread::spawn(move || get(proxy, "/slow").map(|r| r.status));
    eventually("the request is in flight", || {
        let r = get(f.admin, "/debug/endpoints")?;
        let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
        (v[0]["endpoints"][0]["inflight"] == 1).then_some(())
    });
    // The cluster's load, as a peer's autoscaler reads it.
    let r = get(f.admin, "/debug/load").expect("/debug/load answers");
    let load: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    assert_eq!(load["clusters"][0]["cluster"], "slow", "{load}");
    assert_eq!(load["clusters"][0]["inflight"], 1, "{load}");
    // Scale to zero: the instance leaves the endpoint set but is not terminated while its
    // request runs (the shortest drain is 2 s, the request takes 3 s).
    f.write("slow.yaml", &slow.replace("replicas: 1", "replicas: 0"));
    eventually("the instance is draining", || {
        instance(&f.status()).filter(|(_, s)| s == "draining")
    });
    while !request.is_finished() {
        let (i, state) = instance(&f.status()).expect("the instance is listed");
        assert_eq!(i, id);
        assert_eq!(
            state, "draining",
            "terminated while a request to it was in flight"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        request.join().unwrap(),
        Some(200),
        "the in-flight request completes"
    );
    // Its last request done, it goes long before the 300 s deregistration delay.
    eventually("the drained instance is terminated", || {
        match instance(&f.status()) {
            None => Some(()),
            Some((_, s)) if s == "terminated" || s == "shutting-down" => Some(()),
            _ => None,
        }
    });
}

/// Autoscaling end to end on the demo's local provider: open-loop load above the target grows
/// the cluster with every request answered; with the load nearly gone it shrinks back to
/// `minReplicas` after the delay, and a light load running through the scale-down loses no
/// request.
#[test]
fn an_autoscaled_cluster_grows_under_load_and_shrinks_back_without_failing_a_request() {
    let yaml = "apiVersion: fleetlb.dev/v1alpha1\nkind: BackendCluster\nmetadata:\n  name: auto\nspec:\n  route: /auto\n  replicas: 1\n  instanceType: t2.micro\n  provider:\n    local:\n      latencyMs: 100\n  healthCheck:\n    intervalSeconds: 1\n    timeoutSeconds: 1\n    healthyThreshold: 2\n    unhealthyThreshold: 2\n  autoscaling:\n    minReplicas: 1\n    maxReplicas: 4\n    targetInflightPerInstance: 2\n    stableWindowSeconds: 6\n    scaleDownDelaySeconds: 3\n";
    let f = Fleetlb::demo(&[("auto.yaml", yaml.to_string())]);
    let at = |s: &serde_json::Value, k: &str| s["clusters"][0]["status"][k].as_u64();
    let desired = |s: &serde_json::Value| {
        s["clusters"][0]["status"]["autoscaling"]["desiredReplicas"].as_u64()
    };
    eventually("one ready instance", || {
        (at(&f.status(), "readyReplicas") == Some(1)).then_some(())
    });
    // A few connections: at 5 req/s a hundred would each idle past the proxy's 10 s
    // keep-alive timeout and race its close (a client's keep-alive race, not the scale-down).
    let bench = |rate: &str, secs: &str| {
        let out = f.dir.path().join(format!("bench-{rate}.txt"));
        let child = Command::new(env!("CARGO_BIN_EXE_fleetlb"))
            .args(["bench", "--target", &format!("http://{}", f.proxy)])
            .args(["--path", "/auto", "--rate", rate, "--duration", secs])
            .args(["--max-error-rate", "0", "-c", "16"])
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        (child, out)
    };
    let report = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    // 60 req/s x 100 ms = 6 in flight, target 2 per instance: 3 instances (one instance
    // serves 40 req/s at most, so the queue grows and the panic window acts).
    let (mut heavy, heavy_out) = bench("60", "15s");
    eventually("the cluster grows to at least 3 ready instances", || {
        let s = f.status();
        (desired(&s)? >= 3 && at(&s, "readyReplicas")? >= 3).then_some(())
    });
    assert!(
        heavy.wait().unwrap().success(),
        "a request failed under load:\n{}",
        report(&heavy_out)
    );
    // 5 req/s: half a request in flight, one instance.
    let (mut light, light_out) = bench("5", "25s");
    eventually("back to minReplicas", || {
        let s = f.status();
        (desired(&s)? == 1 && at(&s, "replicas")? == 1).then_some(())
    });
    assert!(
        light.wait().unwrap().success(),
        "a request failed during the scale-down:\n{}\n{}",
        report(&light_out),
        f.log_text()
    );
    let events = f.status()["clusters"][0]["events"].clone();
    let scaled: Vec<&str> = events
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["reason"] == "Scaled")
        .filter_map(|e| e["note"].as_str())
        .collect();
    // Each change is an Event (the last 10 are in /status) and a log line.
    let last = scaled.last().copied().unwrap_or_default();
    assert!(
        last.contains(" -> 1: ") && last.ends_with("in flight per instance, target 2"),
        "{events}"
    );
    // The README's metrics: the count and the signal, per cluster.
    let metrics = get(f.admin, "/metrics").expect("/metrics answers").body;
    assert!(
        metrics.contains("fleetlb_autoscaler_desired_replicas{cluster=\"auto\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fleetlb_autoscaler_inflight_per_instance{cluster=\"auto\"}"),
        "{metrics}"
    );
    let log = f.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("scaled 1 -> ") && l.contains("in flight per instance, target 2")),
        "{log}"
    );
}

/// The cluster named in a demo backend's JSON answer.
fn cluster_of(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v["cluster"].as_str().map(str::to_string)
}

/// How many of `n` GETs of `path` (with `host`) each cluster answered; `None` if one failed.
fn split_of(f: &Fleetlb, host: &str, path: &str, n: usize) -> Option<HashMap<String, usize>> {
    let mut by = HashMap::new();
    for _ in 0..n {
        let r = request(
            f.proxy,
            &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )?;
        if r.status != 200 {
            return None;
        }
        *by.entry(cluster_of(&r.body)?).or_default() += 1;
    }
    Some(by)
}

#[test]
fn the_weighted_example_splits_90_10_and_follows_a_weight_edit() {
    let weighted = |name: &str| {
        std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples/weighted")
                .join(name),
        )
        .unwrap()
    };
    let f = Fleetlb::demo(&[
        ("cluster1.yaml", weighted("cluster1.yaml")),
        ("cluster2.yaml", weighted("cluster2.yaml")),
    ]);
    // Both clusters serve /app once their instances pass health checks; then 1000 requests
    // split about 90/10 (the 10 % share within +/- 3.5 %: over 3.5 standard deviations).
    eventually("both clusters answer /app", || {
        split_of(&f, "test", "/app", 60).filter(|by| by.len() == 2)
    });
    let by = split_of(&f, "test", "/app", 1000).expect("every request answered");
    let share = by.get("cluster2").copied().unwrap_or(0) as f64 / 1000.0;
    assert!((0.065..=0.135).contains(&share), "{by:?}");

    // Edit the weights: the next requests follow, none fails.
    f.write(
        "cluster2.yaml",
        &weighted("cluster2.yaml").replace("weight: 10", "weight: 90"),
    );
    f.write(
        "cluster1.yaml",
        &weighted("cluster1.yaml").replace("weight: 90", "weight: 10"),
    );
    eventually("the split follows the edit", || {
        let by = split_of(&f, "test", "/app", 200)?;
        (by.get("cluster2").copied().unwrap_or(0) >= 150).then_some(())
    });

    // A host rule next to them: its host goes to it, every other host to the split.
    f.write(
        "shop.yaml",
        &weighted("cluster2.yaml")
            .replace("name: cluster2", "name: shop")
            .replace("weight: 10", "hosts: [\"Shop.Example.com\"]")
            .replace("replicas: 2", "replicas: 1"),
    );
    eventually("the host rule serves its host", || {
        let by = split_of(&f, "shop.example.com:8000", "/app/x", 20)?;
        (by.len() == 1 && by.contains_key("shop")).then_some(())
    });
    let by = split_of(&f, "other.example.com", "/app", 50).expect("answered");
    assert!(!by.contains_key("shop"), "{by:?}");
}

/// `fleetlb validate` checks files without serving them: each invalid example is one or more
/// lines naming its file, its object and the field its `# fleetlb says:` comment names; the
/// shipped examples pass; a name or route defined twice across files is a problem too.
#[test]
fn validate_prints_every_problem_with_file_object_and_field() {
    let validate = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_fleetlb"))
            .arg("validate")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, text) = validate(&["examples/invalid"]);
    assert_eq!(code, Some(1), "{text}");
    let invalid: Vec<std::path::PathBuf> = std::fs::read_dir("examples/invalid")
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(invalid.len() >= 8);
    for path in &invalid {
        let src = std::fs::read_to_string(path).unwrap();
        let shown = path.display().to_string();
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(&shown)).collect();
        assert!(!lines.is_empty(), "nothing about {shown}:\n{text}");
        if let Some(says) = src.lines().find_map(|l| l.strip_prefix("# fleetlb says: ")) {
            let field = says.split(':').next().unwrap().trim();
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains("BackendCluster ") && l.contains(field)),
                "{shown}: no line names the object and {field}:\n{text}"
            );
        }
    }
    let (code, text) = validate(&["examples/cluster1.yaml", "examples/cluster2.yaml"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("2 valid BackendClusters, 0 problems in 2 files"),
        "{text}"
    );

    // Across files: the same object twice, and a second object on a taken route.
    let dir = tempfile::tempdir().unwrap();
    let one = example("cluster1.yaml");
    std::fs::write(dir.path().join("a.yaml"), &one).unwrap();
    std::fs::write(dir.path().join("b.yaml"), &one).unwrap();
    std::fs::write(
        dir.path().join("c.yaml"),
        one.replace("name: cluster1", "name: other"),
    )
    .unwrap();
    let (code, text) = validate(&[dir.path().to_str().unwrap()]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(
            "b.yaml (document 1): BackendCluster default/cluster1: metadata.name: also defined in"
        ),
        "{text}"
    );
    assert!(
        text.contains("c.yaml (document 1): BackendCluster default/other: spec.route: /cluster1 is already served by cluster1"),
        "{text}"
    );
    // Nothing to check is not a pass.
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(validate(&[empty.path().to_str().unwrap()]).0, Some(1));
    assert_eq!(validate(&["no/such/file.yaml"]).0, Some(1));
    assert!(usage_error(&["validate"]).contains("<PATH>"));
}

#[test]
fn standalone_on_a_directory_without_a_valid_file_says_so_on_stderr_and_in_readyz() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/invalid");
    let admin_port = free_port();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetlb"))
        .args(["standalone", "--config", dir.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0"])
        .args(["--admin", &format!("127.0.0.1:{admin_port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let readyz = eventually("/readyz names the problem", || {
        get(admin, "/readyz").filter(|r| r.body.contains("no valid BackendCluster"))
    });
    let stderr = eventually("stderr says so", || {
        std::fs::read_to_string(log.path())
            .ok()
            .filter(|t| t.contains("no valid BackendCluster in"))
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(readyz.status, 503, "{}", readyz.body);
    assert!(readyz.body.contains(".yaml"), "{}", readyz.body);
    assert!(stderr.contains("/readyz answers 503"), "{stderr}");
}

/// The README's quick start, run as written (its addresses pointed at this test's demo): the
/// front door cannot rot unnoticed.
#[test]
fn the_readme_quick_start_works_as_written() {
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let blocks: Vec<&str> = readme.split("```").collect();
    // Fenced blocks are the odd pieces; the quick start is the `sh` one with the curls.
    let quick = blocks
        .iter()
        .skip(1)
        .step_by(2)
        .find(|b| b.starts_with("sh") && b.contains("curl localhost:8000/cluster1"))
        .expect("the README has its quick-start block");
    let table_header = blocks
        .iter()
        .skip(1)
        .step_by(2)
        .find_map(|b| b.lines().find(|l| l.starts_with("NAME ")))
        .expect("the README shows fleetlb status's table");

    let f = Fleetlb::demo(&demo_clusters());
    f.wait_both_clusters_serve("both clusters serve");
    // As a user reads it: a few seconds after the start, every instance Ready.
    eventually("every instance Ready in /status", || {
        let st = f.status();
        let clusters = st["clusters"].as_array()?.clone();
        (clusters.len() == 2
            && clusters
                .iter()
                .all(|c| c["status"]["readyReplicas"] == c["desired"]))
        .then_some(())
    });
    let exe = env!("CARGO_BIN_EXE_fleetlb");
    let mut outputs = Vec::new();
    for line in quick.lines().skip(1) {
        let command = line.split("  #").next().unwrap().trim();
        if command.is_empty() || command.starts_with('#') {
            continue;
        }
        let command = command
            .replace("localhost:8000", &f.proxy.to_string())
            .replace("localhost:9090", &f.admin.to_string())
            .replace(
                "cargo run --release -- status",
                &format!("{exe} status --admin {}", f.admin),
            );
        let out = Command::new("sh").arg("-c").arg(&command).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{command}: {out:?}");
        outputs.push((command, text));
    }
    let output = |needle: &str| {
        outputs
            .iter()
            .find(|(c, _)| c.contains(needle))
            .map(|(_, o)| o.as_str())
            .unwrap_or_else(|| panic!("the quick start runs {needle}"))
    };
    for cluster in ["cluster1", "cluster2"] {
        let body: serde_json::Value = serde_json::from_str(output(&format!("/{cluster}"))).unwrap();
        assert_eq!(body["cluster"], cluster, "{body}");
        assert!(body["instance_id"].as_str().unwrap().starts_with("i-"));
    }
    assert!(output("/metrics").contains("fleetlb_requests_total"));
    let endpoints: serde_json::Value = serde_json::from_str(output("/debug/endpoints")).unwrap();
    assert_eq!(endpoints.as_array().unwrap().len(), 2, "{endpoints}");
    let status = output(" status ");
    let words = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(
        words(status.lines().next().unwrap()),
        words(table_header),
        "{status}"
    );
    assert!(status.contains("AllReplicasReady"), "{status}");
    // The access log the README shows: the demo prints a line per request on stdout.
    let stdout = f.dir.path().join("stdout.log");
    eventually("the demo's access log names a /cluster1 request", || {
        std::fs::read_to_string(&stdout)
            .ok()?
            .lines()
            .find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                (v["path"] == "/cluster1" && v["status"] == 200 && v["cluster"] == "cluster1")
                    .then_some(())
            })
    });
    // The status page the README points at.
    assert!(readme.contains("http://localhost:9090/"));
    let page = get(f.admin, "/").unwrap();
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<title>fleetlb</title>"));
}

#[test]
fn the_grpc_example_spreads_one_connections_calls_over_every_instance() {
    let f = Fleetlb::demo(&[("echo.yaml", example("grpc/echo.yaml"))]);
    let peer = concat!(env!("CARGO_MANIFEST_DIR"), "/dataplane/tests/grpc/peer.py");
    // A real gRPC client (grpcio) on ONE connection: every call is balanced on its own.
    let calls = |extra: &[&str]| -> serde_json::Value {
        let out = Command::new("python3")
            .args([peer, "call", &f.proxy.to_string()])
            .args(extra)
            .output()
            .expect("python3 with grpcio (.ci/test installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let v = eventually("4 instances answer calls from one connection", || {
        let v = calls(&["200", "--concurrency", "4"]);
        (v["codes"]["OK"] == 200 && v["by_instance"].as_object()?.len() == 4).then_some(v)
    });
    assert!(
        v["by_instance"]
            .as_object()
            .unwrap()
            .keys()
            .all(|id| id.starts_with("i-")),
        "{v}"
    );
    // A server-streaming call, its messages and trailers through.
    let v = calls(&["1", "--stream", "5"]);
    assert_eq!(v["codes"]["OK"], 1, "{v}");
    assert_eq!(v["messages"].as_array().unwrap().len(), 5, "{v}");
    let metrics = get(f.admin, "/metrics").expect("metrics answer").body;
    assert!(
        metrics.contains(
            r#"fleetlb_grpc_calls_total{cluster="echo",grpc_status="0",source="instance"}"#
        ),
        "{metrics}"
    );
}

/// A stand-in for the EC2 instance metadata service on loopback (IMDSv2: a token from `PUT
/// /latest/api/token`, required on every `GET`), naming `zone`. Returns its URL.
fn fake_imds(zone: &'static str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let mut token = false;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                token |= h
                    .to_ascii_lowercase()
                    .starts_with("x-aws-ec2-metadata-token: tok");
            }
            let (status, body) = if line.starts_with("PUT /latest/api/token") {
                (
                    "200 OK\r\nx-aws-ec2-metadata-token-ttl-seconds: 21600",
                    "tok",
                )
            } else if line.starts_with("GET /latest/meta-data/placement/availability-zone") && token
            {
                ("200 OK", zone)
            } else {
                ("401 Unauthorized", "")
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

#[test]
fn the_proxy_learns_its_zone_from_the_instance_metadata_service() {
    let imds = fake_imds("us-east-1b");
    let f = Fleetlb::standalone_env(
        &demo_clusters(),
        &["--zone", "imds"],
        &[("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.as_str())],
    );
    eventually("the zone from IMDS in the log", || {
        let log = f.log_text();
        (log.contains("zone from the instance metadata service") && log.contains("us-east-1b"))
            .then_some(())
    });
    // And without one (nothing listens there), the proxy serves all the same.
    let g = Fleetlb::standalone_env(
        &demo_clusters(),
        &["--zone", "imds"],
        &[("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9")],
    );
    eventually("cluster1 serves without a zone", || {
        g.distinct_instances("/cluster1", 10)
    });
    assert!(g.log_text().contains("routing without a zone preference"));
}
