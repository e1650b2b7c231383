//! The interruption queue end to end: `fleetlb standalone --interruption-queue` serving a
//! local cluster under load, a real moto_server standing in for SQS, and the spot
//! interruption warning EventBridge would send put on the queue. Not one request fails while
//! the named instance drains, is terminated and is replaced.

#[path = "support/moto.rs"]
mod moto_support;
mod support;

use std::process::{Command, Stdio};

use moto_support::Moto;
use support::*;

const QUEUE: &str = "fleetlb-interruptions";

/// Messages still in the queue, received or not.
fn messages_left(moto: &Moto, url: &str) -> u64 {
    let xml = moto.sqs(&format!(
        "Action=GetQueueAttributes&QueueUrl={}&AttributeName.1=All",
        Moto::encode(url)
    ));
    // <Attribute><Name>ApproximateNumberOfMessages</Name><Value>0</Value></Attribute>
    xml.split("<Attribute>")
        .skip(1)
        .filter(|a| {
            a.contains("<Name>ApproximateNumberOfMessages</Name>")
                || a.contains("<Name>ApproximateNumberOfMessagesNotVisible</Name>")
        })
        .filter_map(|a| Moto::values(a, "Value").first()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn a_spot_interruption_warning_drains_and_replaces_the_instance_without_failing_a_request() {
    let moto = Moto::start();
    let url = Moto::values(
        &moto.sqs(&format!("Action=CreateQueue&QueueName={QUEUE}")),
        "QueueUrl",
    )
    .pop()
    .expect("a queue URL");
    let yaml = "apiVersion: fleetlb.dev/v1alpha1\nkind: BackendCluster\nmetadata:\n  name: web\nspec:\n  route: /web\n  replicas: 3\n  instanceType: t2.large\n  provider:\n    local:\n      latencyMs: 20\n  healthCheck:\n    intervalSeconds: 1\n    timeoutSeconds: 1\n    healthyThreshold: 2\n    unhealthyThreshold: 2\n";
    let mut env: Vec<(&str, String)> = moto.env();
    env.push(("FLEETLB_SQS_ENDPOINT", moto.url()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let f = Fleetlb::standalone_env(
        &[("web.yaml", yaml.to_string())],
        &["--interruption-queue", QUEUE],
        &env,
    );
    let ready = |s: &serde_json::Value| -> Vec<String> {
        s["clusters"][0]["status"]["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["healthy"] == true && i["state"] == "running")
            .filter_map(|i| i["id"].as_str().map(String::from))
            .collect()
    };
    let before = eventually("3 ready instances", || {
        Some(ready(&f.status())).filter(|r| r.len() == 3)
    });
    let victim = before[0].clone();
    let (victim_pid, _) = backends_of(f.pid(), Some("web"))
        .into_iter()
        .find(|(_, cmd)| cmd.contains(&format!("--id {victim} ")))
        .expect("the victim's backend process");

    // Steady load through the proxy for the whole exchange; any failed request fails the run.
    let report = f.dir.path().join("bench.txt");
    let mut bench = Command::new(env!("CARGO_BIN_EXE_fleetlb"))
        .args(["bench", "--target", &format!("http://{}", f.proxy)])
        .args(["--path", "/web", "--rate", "100", "--duration", "20s"])
        .args(["--max-error-rate", "0", "-c", "16"])
        .stdout(std::fs::File::create(&report).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually("the load is running", || {
        (f.metric("fleetlb_requests_total", &[("cluster", "web")]) >= 100.0).then_some(())
    });
    let warning = serde_json::json!({
        "version": "0", "id": "1e5527d7-bb36-4607-3370-4164db56a40e",
        "detail-type": "EC2 Spot Instance Interruption Warning", "source": "aws.ec2",
        "account": "123456789012", "time": "2026-12-06T12:00:00Z", "region": "us-east-1",
        "resources": [format!("arn:aws:ec2:us-east-1a:instance/{victim}")],
        "detail": {"instance-id": victim, "instance-action": "terminate"},
    });
    moto.sqs(&format!(
        "Action=SendMessage&QueueUrl={}&MessageBody={}",
        Moto::encode(&url),
        Moto::encode(&warning.to_string())
    ));

    // Out of the endpoint set, replaced by a new instance, its process ended, the message
    // deleted.
    eventually("the victim leaves the endpoint set", || {
        let s = f.status();
        let endpoints = s["clusters"][0]["status"]["endpoints"].as_array()?.clone();
        (!endpoints.iter().any(|e| e["id"] == victim.as_str())).then_some(())
    });
    eventually("3 ready instances again, the victim not among them", || {
        Some(ready(&f.status())).filter(|r| r.len() == 3 && !r.contains(&victim))
    });
    assert!(
        bench.try_wait().unwrap().is_none(),
        "the load ended before the replacement served: the run proves nothing"
    );
    eventually("the victim's process ends", || {
        (!alive(victim_pid)).then_some(())
    });
    eventually("the message is deleted", || {
        (messages_left(&moto, &url) == 0).then_some(())
    });
    assert!(
        bench.wait().unwrap().success(),
        "a request failed:\n{}\n{}",
        std::fs::read_to_string(&report).unwrap_or_default(),
        f.log_text()
    );

    // Said in an Event and a metric; the other instances were never touched.
    let s = f.status();
    let events = &s["clusters"][0]["events"];
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["reason"] == "Interrupted"
                && e["type"] == "Warning"
                && e["note"].as_str().is_some_and(
                    |n| n.starts_with(&format!("{victim}: a spot interruption warning"))
                )),
        "{events}"
    );
    assert!(ready(&s).contains(&before[1]) && ready(&s).contains(&before[2]));
    assert_eq!(
        f.metric(
            "fleetlb_controller_interruption_messages_total",
            &[("kind", "spot_interruption")]
        ),
        1.0
    );
}
