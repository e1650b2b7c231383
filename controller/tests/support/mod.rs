//! Shared by the controller's integration tests: a real `moto_server` on a free 127.0.0.1 port,
//! and an SDK configuration pointing at it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};

pub struct Moto {
    child: Child,
    pub url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn moto() -> Moto {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server is installed (pip install 'moto[server]'; .ci/run does it)");
    let url = format!("http://127.0.0.1:{port}");
    let m = Moto { child, url };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "moto_server did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    m
}

pub fn sdk_config(url: &str) -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(url)
        .credentials_provider(aws_sdk_ec2::config::SharedCredentialsProvider::new(
            aws_sdk_ec2::config::Credentials::new("testing", "testing", None, None, "test"),
        ))
        .build()
}

pub struct Env {
    pub _moto: Moto,
    pub ec2: aws_sdk_ec2::Client,
    pub conf: aws_config::SdkConfig,
    pub image: String,
    pub subnets: Vec<String>,
}

pub async fn env() -> Env {
    let m = moto().await;
    let conf = sdk_config(&m.url);
    let ec2 = aws_sdk_ec2::Client::new(&conf);
    let images = ec2
        .describe_images()
        .send()
        .await
        .expect("moto answers DescribeImages");
    let image = images.images()[0].image_id().unwrap().to_string();
    let subnets = ec2.describe_subnets().send().await.unwrap();
    let subnets = subnets
        .subnets()
        .iter()
        .take(2)
        .map(|s| s.subnet_id().unwrap().to_string())
        .collect();
    Env {
        _moto: m,
        ec2,
        conf,
        image,
        subnets,
    }
}

/// What the fault proxy does to calls of one EC2 action.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// 503 `RequestLimitExceeded`, EC2's throttling answer.
    Throttle,
    /// 500 `InternalError`.
    ServerError,
    /// No answer at all (the request is read, the response never comes).
    Hang,
}

#[derive(Default)]
struct FaultState {
    faults: HashMap<String, Fault>,
    counts: HashMap<String, u64>,
}

/// A small HTTP proxy between the SDK and moto that injects faults per EC2 action and counts
/// the calls that reach it.
pub struct FaultProxy {
    pub url: String,
    state: Arc<Mutex<FaultState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    pub async fn start(upstream: &str) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(FaultState::default()));
        let upstream: hyper::Uri = upstream.parse().unwrap();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (st, client, upstream) = (st.clone(), client.clone(), upstream.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (st, client, upstream) = (st.clone(), client.clone(), upstream.clone());
                        async move {
                            let (mut parts, body) = req.into_parts();
                            let body = body.collect().await?.to_bytes();
                            let action = form_value(&body, "Action").unwrap_or_default();
                            let fault = {
                                let mut s = st.lock().unwrap();
                                *s.counts.entry(action.clone()).or_default() += 1;
                                s.faults.get(&action).copied()
                            };
                            if let Some(f) = fault {
                                let (status, code) = match f {
                                    Fault::Throttle => (503, "RequestLimitExceeded"),
                                    Fault::ServerError => (500, "InternalError"),
                                    Fault::Hang => {
                                        std::future::pending::<()>().await;
                                        unreachable!()
                                    }
                                };
                                let xml = format!(
                                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>injected by the test</Message></Error></Errors><RequestID>fault</RequestID></Response>"
                                );
                                return Ok::<_, hyper::Error>(
                                    Response::builder()
                                        .status(status)
                                        .body(Full::new(Bytes::from(xml)))
                                        .unwrap(),
                                );
                            }
                            let mut uri = upstream.clone().into_parts();
                            uri.path_and_query = parts.uri.path_and_query().cloned();
                            parts.uri = hyper::Uri::from_parts(uri).unwrap();
                            let resp = client
                                .request(Request::from_parts(parts, Full::new(body)))
                                .await
                                .unwrap();
                            let (parts, body) = resp.into_parts();
                            let body = body.collect().await?.to_bytes();
                            Ok(Response::from_parts(parts, Full::new(body)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FaultProxy { url, state, task }
    }

    /// Sets (or clears) the fault for `action`.
    pub fn set(&self, action: &str, fault: Option<Fault>) {
        let mut s = self.state.lock().unwrap();
        match fault {
            Some(f) => s.faults.insert(action.to_string(), f),
            None => s.faults.remove(action),
        };
    }

    /// Calls of `action` that reached the proxy.
    pub fn count(&self, action: &str) -> u64 {
        self.state
            .lock()
            .unwrap()
            .counts
            .get(action)
            .copied()
            .unwrap_or(0)
    }
}

fn form_value(body: &[u8], key: &str) -> Option<String> {
    std::str::from_utf8(body).ok()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.to_string())
    })
}

/// Live (pending or running) instances carrying `controller` as owner, of cluster `name` when
/// given.
pub async fn live(
    ec2: &aws_sdk_ec2::Client,
    controller: &str,
    name: Option<&str>,
) -> Vec<aws_sdk_ec2::types::Instance> {
    use aws_sdk_ec2::types::Filter;
    use fleetlb_controller::aws::tags;
    let mut call = ec2.describe_instances().filters(
        Filter::builder()
            .name(format!("tag:{}", tags::CONTROLLER))
            .values(controller)
            .build(),
    );
    if let Some(name) = name {
        call = call.filters(
            Filter::builder()
                .name(format!("tag:{}", tags::NAME))
                .values(name)
                .build(),
        );
    }
    let out = call
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .build(),
        )
        .send()
        .await
        .unwrap();
    out.reservations()
        .iter()
        .flat_map(|r| r.instances().to_vec())
        .collect()
}
