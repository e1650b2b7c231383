//! `fleetlb status`: the running fleetlb's `/status` as a table, like `kubectl get bc`.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

pub async fn print(admin: SocketAddr, json: bool) -> anyhow::Result<ExitCode> {
    let body = fetch(admin).await.with_context(|| {
        format!("cannot read status from {admin} (is fleetlb running with --admin {admin}?)")
    })?;
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(ExitCode::SUCCESS);
    }
    let v: Value = serde_json::from_slice(&body).context("status is not JSON")?;
    print!("{}", render(&v, k8s_openapi::jiff::Timestamp::now()));
    Ok(ExitCode::SUCCESS)
}

async fn fetch(admin: SocketAddr) -> anyhow::Result<Bytes> {
    let stream = tokio::net::TcpStream::connect(admin).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::get("/status")
        .header(http::header::HOST, admin.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    if !resp.status().is_success() {
        bail!("/status answered {}", resp.status());
    }
    Ok(resp.into_body().collect().await?.to_bytes())
}

fn age(created: &str, now: k8s_openapi::jiff::Timestamp) -> String {
    let Ok(t) = created.parse::<k8s_openapi::jiff::Timestamp>() else {
        return "?".into();
    };
    let s = now.duration_since(t).as_secs().max(0);
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// The table for a `/status` document. A CAPACITY column (EC2 types and markets serving)
/// joins when some cluster reports one.
pub fn render(v: &Value, now: k8s_openapi::jiff::Timestamp) -> String {
    let capacity = v["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["status"]["capacity"].is_string());
    let mut rows: Vec<Vec<String>> = vec![
        [
            "NAME", "ROUTE", "DESIRED", "READY", "TYPE", "PROVIDER", "CAPACITY", "REASON", "AGE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for c in v["clusters"].as_array().into_iter().flatten() {
        let s = |k: &str| c[k].as_str().unwrap_or("").to_string();
        let ns = s("namespace");
        let name = if ns == "default" {
            s("name")
        } else {
            format!("{ns}/{}", s("name"))
        };
        let status = &c["status"];
        let ready_cond = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["type"] == "Ready");
        let mut reason = ready_cond
            .and_then(|x| x["reason"].as_str())
            .unwrap_or("Pending")
            .to_string();
        if c["deleting"].as_bool() == Some(true) {
            reason = "Deleting".into();
        } else if c.get("rejectedEdit").is_some_and(|r| !r.is_null()) {
            reason.push_str(",InvalidSpec");
        }
        rows.push(
            [
                name,
                s("route"),
                c["desired"].as_u64().unwrap_or(0).to_string(),
                status["readyReplicas"].as_i64().unwrap_or(0).to_string(),
                s("instanceType"),
                s("provider"),
                status["capacity"].as_str().unwrap_or("-").to_string(),
                reason,
                age(&s("created"), now),
            ]
            .to_vec(),
        );
    }
    if !capacity {
        for r in &mut rows {
            r.remove(6);
        }
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    for e in v["errors"].as_array().into_iter().flatten() {
        if let Some(e) = e.as_str() {
            out.push_str(&format!("error: {e}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_kubectl_get() {
        let v = serde_json::json!({
            "clusters": [{
                "namespace": "default", "name": "cluster1", "route": "/cluster1",
                "instanceType": "t2.micro", "provider": "local", "desired": 4,
                "created": "2026-01-01T00:00:00Z", "deleting": false,
                "status": {"readyReplicas": 3, "conditions": [{"type": "Ready", "reason": "HealthCheckFailing"}]}
            }],
            "errors": ["x.yaml: BackendCluster default/bad (document 1): spec.replicas: must be between 0 and 1000, got 5000"]
        });
        let now: k8s_openapi::jiff::Timestamp = "2026-01-01T00:05:00Z".parse().unwrap();
        let out = render(&v, now);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("NAME"), "{out}");
        assert!(
            lines[1].contains("cluster1")
                && lines[1].contains("HealthCheckFailing")
                && lines[1].ends_with("5m"),
            "{out}"
        );
        assert!(lines[2].starts_with("error: x.yaml"), "{out}");
        assert!(
            !out.contains("CAPACITY"),
            "no EC2 cluster, no column: {out}"
        );
    }

    #[test]
    fn an_ec2_cluster_adds_the_capacity_column() {
        let v = serde_json::json!({
            "clusters": [{
                "namespace": "default", "name": "web", "route": "/web",
                "instanceType": "t3.small", "provider": "aws", "desired": 4,
                "created": "2026-01-01T00:00:00Z",
                "status": {"readyReplicas": 4, "capacity": "3 x t3.small spot, 1 x t3.small on-demand",
                           "conditions": [{"type": "Ready", "reason": "AllReplicasReady"}]}
            }],
        });
        let now: k8s_openapi::jiff::Timestamp = "2026-01-01T00:05:00Z".parse().unwrap();
        let out = render(&v, now);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].contains("PROVIDER   CAPACITY"), "{out}");
        assert!(
            lines[1].contains("3 x t3.small spot, 1 x t3.small on-demand"),
            "{out}"
        );
    }
}
