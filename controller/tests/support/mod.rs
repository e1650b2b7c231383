//! Shared by the controller's integration tests: a real `moto_server` on a free 127.0.0.1 port,
//! and an SDK configuration pointing at it.
#![allow(dead_code)]

pub mod fake;

use std::collections::HashMap;
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
    // Port 0: moto_server binds a port of its own and says which (` * Running on http://…`),
    // so parallel tests never race for one.
    let mut child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("moto_server is installed (pip install 'moto[server]'; .ci/run does it)");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        // Reads to the end: moto logs every request, and a full pipe would stall it.
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) {
                let _ = tx.send(url.to_string());
            }
        }
    });
    let url = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("moto_server says where it listens");
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("moto_server's URL has a port");
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
        .take(3)
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
    /// The call takes effect (it reaches moto) but its answer is lost: 500 `InternalError`,
    /// for every retry too. What a crash or a network cut right after the call looks like.
    LoseAnswer,
}

#[derive(Default)]
struct FaultState {
    faults: HashMap<String, Fault>,
    counts: HashMap<String, u64>,
    /// Every request body that reached the proxy, in order.
    requests: Vec<String>,
    /// RunInstances by ClientToken: the parameters of the first call and moto's answer.
    tokens: HashMap<String, (String, Bytes)>,
    /// Answers of `IdempotentParameterMismatch`.
    mismatches: u64,
    /// While set, instances launched through the proxy are missing from DescribeInstances.
    hide_new: bool,
    hidden: Vec<String>,
    /// Subnets without capacity: RunInstances there answers `InsufficientInstanceCapacity`.
    full: Vec<String>,
    /// No spot capacity anywhere.
    no_spot: bool,
    /// Spot launches answered with this error code (e.g. the account's spot limit).
    spot_code: Option<&'static str>,
    /// (instance type, subnet) without capacity.
    full_type: Vec<(String, String)>,
}

/// A small HTTP proxy between the SDK and moto that adds what moto does not enforce and real
/// EC2 does:
///
/// - **ClientToken idempotency with parameter matching**: a RunInstances repeating a token
///   with the same parameters gets the first answer again (no second instance); with other
///   parameters it gets `IdempotentParameterMismatch`.
/// - **Eventual consistency** on demand ([`FaultProxy::hide_new`]): new instances missing
///   from DescribeInstances for as long as the test says.
/// - **Faults** per action (throttling, server errors, no answer at all).
///
/// It records every request body, so tests check what the code really sent.
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
                            // SQS speaks JSON (`X-Amz-Target: AmazonSQS.ReceiveMessage`): it is
                            // recorded as `Service=sqs&Action=...&Queue=...` (the queue's URL or
                            // name), so the IAM test sees what it was called on.
                            let sqs = parts
                                .headers
                                .get("x-amz-target")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|t| t.strip_prefix("AmazonSQS."))
                                .map(String::from);
                            let action = sqs
                                .clone()
                                .or_else(|| form_value(&body, "Action"))
                                .unwrap_or_default();
                            let text = match &sqs {
                                Some(op) => {
                                    let v: serde_json::Value =
                                        serde_json::from_slice(&body).unwrap_or_default();
                                    let queue = v["QueueUrl"]
                                        .as_str()
                                        .or(v["QueueName"].as_str())
                                        .unwrap_or_default()
                                        .to_string();
                                    format!("Service=sqs&Action={op}&Queue={queue}")
                                }
                                None => String::from_utf8_lossy(&body).to_string(),
                            };
                            let token = (action == "RunInstances")
                                .then(|| form_value(&body, "ClientToken"))
                                .flatten();
                            let (fault, replay) = {
                                let mut s = st.lock().unwrap();
                                *s.counts.entry(action.clone()).or_default() += 1;
                                s.requests.push(text.clone());
                                let replay = token.as_ref().and_then(|t| {
                                    s.tokens.get(t).map(|(params, answer)| {
                                        (params == &text).then(|| answer.clone())
                                    })
                                });
                                if matches!(replay, Some(None)) {
                                    s.mismatches += 1;
                                }
                                (s.faults.get(&action).copied(), replay)
                            };
                            let lose = matches!(fault, Some(Fault::LoseAnswer));
                            let full = action == "RunInstances"
                                && (form_value(&body, "SubnetId")
                                    .is_some_and(|sn| st.lock().unwrap().full.contains(&sn))
                                    || (st.lock().unwrap().no_spot
                                        && form_value(&body, "InstanceMarketOptions.MarketType")
                                            .as_deref()
                                            == Some("spot"))
                                    || form_value(&body, "InstanceType")
                                        .zip(form_value(&body, "SubnetId"))
                                        .is_some_and(|p| {
                                            st.lock().unwrap().full_type.contains(&p)
                                        }));
                            if full {
                                return Ok(error_response(500, "InsufficientInstanceCapacity"));
                            }
                            let spot_code = st.lock().unwrap().spot_code;
                            if let Some(code) = spot_code
                                && action == "RunInstances"
                                && form_value(&body, "InstanceMarketOptions.MarketType").as_deref()
                                    == Some("spot")
                            {
                                return Ok(error_response(400, code));
                            }
                            match replay {
                                Some(_) if lose => {
                                    return Ok(error_response(500, "InternalError"));
                                }
                                Some(Some(answer)) => {
                                    return Ok(Response::builder()
                                        .status(200)
                                        .body(Full::new(answer))
                                        .unwrap());
                                }
                                Some(None) => {
                                    return Ok(error_response(400, "IdempotentParameterMismatch"));
                                }
                                None => {}
                            }
                            if let Some(f) = fault.filter(|_| !lose) {
                                let (status, code) = match f {
                                    Fault::Throttle => (503, "RequestLimitExceeded"),
                                    Fault::ServerError => (500, "InternalError"),
                                    Fault::Hang => {
                                        std::future::pending::<()>().await;
                                        unreachable!()
                                    }
                                    Fault::LoseAnswer => unreachable!("handled after the call"),
                                };
                                return Ok::<_, hyper::Error>(error_response(status, code));
                            }
                            // moto has no `client-token` filter; EC2 does. The proxy applies
                            // it: the call goes to moto without it, and the answer keeps only
                            // the reservations of that token.
                            let mut body = body;
                            let mut by_token = None;
                            if action == "DescribeInstances"
                                && form_value(&body, "Filter.1.Name").as_deref()
                                    == Some("client-token")
                            {
                                by_token = form_value(&body, "Filter.1.Value.1");
                                let kept: Vec<&str> = text
                                    .split('&')
                                    .filter(|kv| !kv.starts_with("Filter.1."))
                                    .collect();
                                body = Bytes::from(kept.join("&"));
                                parts.headers.remove(hyper::header::CONTENT_LENGTH);
                            }
                            let mut uri = upstream.clone().into_parts();
                            uri.path_and_query = parts.uri.path_and_query().cloned();
                            parts.uri = hyper::Uri::from_parts(uri).unwrap();
                            let resp = client
                                .request(Request::from_parts(parts, Full::new(body)))
                                .await
                                .unwrap();
                            let (mut parts, body) = resp.into_parts();
                            // The body may be rewritten below; its length comes from the body.
                            parts.headers.remove(hyper::header::CONTENT_LENGTH);
                            parts.headers.remove(hyper::header::TRANSFER_ENCODING);
                            let mut body = body.collect().await?.to_bytes();
                            let mut s = st.lock().unwrap();
                            if let Some(t) = token
                                && parts.status.is_success()
                            {
                                s.tokens.insert(t, (text, body.clone()));
                                if s.hide_new {
                                    let ids = instance_ids(&body);
                                    s.hidden.extend(ids);
                                }
                            }
                            if let Some(t) = &by_token {
                                body = Bytes::from(only_reservations_with(
                                    &String::from_utf8_lossy(&body),
                                    &format!("<clientToken>{t}</clientToken>"),
                                ));
                            }
                            if action == "DescribeInstances" && !s.hidden.is_empty() {
                                body = Bytes::from(without_reservations_of(
                                    &String::from_utf8_lossy(&body),
                                    &s.hidden,
                                ));
                            }
                            if lose {
                                return Ok(error_response(500, "InternalError"));
                            }
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

    /// While `on`, instances launched through the proxy are missing from DescribeInstances
    /// (EC2's eventual consistency, stretched); turning it off shows them all.
    pub fn hide_new(&self, on: bool) {
        let mut s = self.state.lock().unwrap();
        s.hide_new = on;
        if !on {
            s.hidden.clear();
        }
    }

    /// RunInstances of `instance_type` in `subnet` answers `InsufficientInstanceCapacity`.
    pub fn no_capacity_for(&self, instance_type: &str, subnet: &str) {
        self.state
            .lock()
            .unwrap()
            .full_type
            .push((instance_type.to_string(), subnet.to_string()));
    }

    /// Spot RunInstances answers `InsufficientInstanceCapacity` from now on, in every subnet.
    /// Every spot RunInstances is answered `code` (400), on-demand ones go through.
    pub fn refuse_spot_with(&self, code: &'static str) {
        self.state.lock().unwrap().spot_code = Some(code);
    }

    pub fn no_spot_capacity(&self) {
        self.state.lock().unwrap().no_spot = true;
    }

    /// RunInstances in `subnet` answers `InsufficientInstanceCapacity` from now on.
    pub fn no_capacity_in(&self, subnet: &str) {
        self.state.lock().unwrap().full.push(subnet.to_string());
    }

    /// Every request body that reached the proxy so far (form-encoded EC2 Query requests).
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The RunInstances requests that reached the proxy, in order, each as its form fields.
    pub fn run_instances(&self) -> Vec<Vec<(String, String)>> {
        self.requests()
            .iter()
            .map(|b| form(b))
            .filter(|f| field(f, "Action").as_deref() == Some("RunInstances"))
            .collect()
    }

    /// The `keys` fields of every RunInstances so far, in order (empty where one is absent).
    pub fn run_fields<const N: usize>(&self, keys: [&str; N]) -> Vec<[String; N]> {
        self.run_instances()
            .iter()
            .map(|f| keys.map(|k| field(f, k).unwrap_or_default()))
            .collect()
    }

    /// How many RunInstances were answered `IdempotentParameterMismatch`.
    pub fn mismatches(&self) -> u64 {
        self.state.lock().unwrap().mismatches
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

/// The form parameters of an EC2 Query request body, percent-decoded, in order.
pub fn form(body: &str) -> Vec<(String, String)> {
    body.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

/// The value of `key` in a decoded form.
pub fn field(form: &[(String, String)], key: &str) -> Option<String> {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn error_response(status: u16, code: &str) -> Response<Full<Bytes>> {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>injected by the test</Message></Error></Errors><RequestID>fault</RequestID></Response>"
    );
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::from(xml)))
        .unwrap()
}

/// The instance ids in an EC2 XML answer.
fn instance_ids(body: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(body);
    text.split("<instanceId>")
        .skip(1)
        .filter_map(|s| s.split_once("</instanceId>").map(|(id, _)| id.to_string()))
        .collect()
}

/// A DescribeInstances answer without the reservations holding any of `hidden`.
fn without_reservations_of(xml: &str, hidden: &[String]) -> String {
    filter_reservations(xml, |item| {
        !hidden
            .iter()
            .any(|id| item.contains(&format!("<instanceId>{id}</instanceId>")))
    })
}

/// A DescribeInstances answer with only the reservations containing `needle`.
fn only_reservations_with(xml: &str, needle: &str) -> String {
    filter_reservations(xml, |item| item.contains(needle))
}

/// A DescribeInstances answer with the reservations `keep` accepts.
fn filter_reservations(xml: &str, keep: impl Fn(&str) -> bool) -> String {
    let (Some(start), Some(end)) = (xml.find("<reservationSet>"), xml.find("</reservationSet>"))
    else {
        return xml.to_string();
    };
    let inner = &xml[start + "<reservationSet>".len()..end];
    // Top-level <item> elements of the set are reservations; nested ones are counted by depth.
    let mut kept = String::new();
    let mut depth = 0usize;
    let mut item_start = 0usize;
    let mut i = 0usize;
    while i < inner.len() {
        let rest = &inner[i..];
        if rest.starts_with("<item>") {
            if depth == 0 {
                item_start = i;
            }
            depth += 1;
            i += "<item>".len();
        } else if rest.starts_with("</item>") {
            depth = depth.saturating_sub(1);
            i += "</item>".len();
            if depth == 0 {
                let item = &inner[item_start..i];
                if keep(item) {
                    kept.push_str(item);
                }
            }
        } else {
            i += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    format!("{}<reservationSet>{kept}{}", &xml[..start], &xml[end..])
}

/// Live (pending or running) instances carrying `controller` as owner, of cluster `name` when
/// given.
pub async fn live(
    ec2: &aws_sdk_ec2::Client,
    controller: &str,
    name: Option<&str>,
) -> Vec<aws_sdk_ec2::types::Instance> {
    use aws_sdk_ec2::types::Filter;
    use fleetlb_controller::provider::aws::tags;
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

/// Polls `f` until it holds, failing after 20 s.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of an unlabelled gauge or counter in `registry`, or the first series of a labelled
/// one (0 when absent; a series is one or the other, the other reads 0).
pub fn metric(registry: &prometheus::Registry, name: &str) -> f64 {
    registry
        .gather()
        .iter()
        .find(|f| f.name() == name)
        .and_then(|f| f.get_metric().first().cloned())
        .map_or(0.0, |m| {
            m.get_counter().get_value() + m.get_gauge().get_value()
        })
}
