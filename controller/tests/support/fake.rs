//! A provider that launches at once (or fails as told) and an API server that accepts every
//! write and records it: the controller's drivers without a cloud or a cluster.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use fleetlb_controller::error::{ErrorClass, Operation};
use fleetlb_controller::provider::{
    Instance, InstanceState, Launch, LaunchRequest, Provider, ProviderKind,
};
use fleetlb_crds::BackendCluster;
use futures::future::BoxFuture;
use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::Value;
use tower_test::mock;

/// A provider (`local` kind unless `aws`) that launches instantly, or fails as told, and
/// counts its listings.
#[derive(Default)]
pub struct Fake {
    pub aws: bool,
    pub lists: std::sync::atomic::AtomicUsize,
    pub list_fails: Option<ErrorClass>,
    pub launch_fails: Option<ErrorClass>,
    pub instances: Mutex<Vec<Instance>>,
    pub next: AtomicU16,
}

impl Provider for Fake {
    fn kind(&self) -> ProviderKind {
        if self.aws {
            ProviderKind::Aws
        } else {
            ProviderKind::Local
        }
    }

    fn list<'a>(
        &'a self,
        _clusters: &'a [Arc<BackendCluster>],
    ) -> BoxFuture<'a, Result<Vec<Instance>, fleetlb_controller::Error>> {
        self.lists.fetch_add(1, Ordering::Relaxed);
        let r = match self.list_fails {
            Some(class) => Err(fleetlb_controller::Error::new(
                ProviderKind::Local,
                Operation::List,
                class,
                "RequestLimitExceeded: Request limit exceeded.",
            )),
            None => Ok(self.instances.lock().unwrap().clone()),
        };
        Box::pin(async move { r })
    }

    fn launch<'a>(
        &'a self,
        req: &'a LaunchRequest,
    ) -> BoxFuture<'a, Result<Launch, fleetlb_controller::Error>> {
        let r = match self.launch_fails {
            Some(class) => Err(fleetlb_controller::Error::new(
                ProviderKind::Local,
                Operation::Launch,
                class,
                "InsufficientInstanceCapacity: none left",
            )),
            None => {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                let i = Instance {
                    id: format!("i-{n:04}"),
                    owner: req.owner.clone(),
                    owner_uid: req.owner_uid.clone(),
                    slot: req.slot,
                    attempt: req.attempt,
                    address: Some(SocketAddr::from(([127, 0, 0, 1], 1000 + n))),
                    state: InstanceState::Running,
                    instance_type: req.instance_type.clone(),
                    spec_hash: req.spec_hash.clone(),
                    launched_at: SystemTime::now(),
                    launched_as: None,
                    client_token: Some(req.token()),
                    provider: ProviderKind::Local,
                };
                self.instances.lock().unwrap().push(i.clone());
                Ok(Launch::Made(Box::new(i)))
            }
        };
        Box::pin(async move { r })
    }

    fn terminate<'a>(
        &'a self,
        ids: &'a [String],
    ) -> BoxFuture<'a, Result<(), fleetlb_controller::Error>> {
        for i in self.instances.lock().unwrap().iter_mut() {
            if ids.contains(&i.id) {
                i.state = InstanceState::Terminated;
            }
        }
        Box::pin(async { Ok(()) })
    }
}

/// What the API server was sent, per object name: the last status written, and every Event.
#[derive(Default)]
pub struct Recorded {
    pub statuses: BTreeMap<String, Value>,
    pub events: BTreeMap<String, Vec<Value>>,
}

/// An API server holding `stored` (by name) that accepts every status write (answering with
/// the stored object and the status written) and every Event, and records them.
pub fn api_server(
    stored: BTreeMap<String, Value>,
) -> (Client, Arc<Mutex<Recorded>>, tokio::task::JoinHandle<()>) {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let recorded: Arc<Mutex<Recorded>> = Arc::default();
    let task = {
        let recorded = recorded.clone();
        tokio::spawn(async move {
            while let Some((req, reply)) = handle.next_request().await {
                let uri = req.uri().path().to_string();
                let get = req.method() == http::Method::GET;
                let bytes = req.into_body().collect_bytes().await.unwrap();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let mut recorded = recorded.lock().unwrap();
                let mut answer = body.clone();
                if let Some(name) = uri
                    .strip_suffix("/status")
                    .and_then(|u| u.rsplit('/').next())
                {
                    recorded
                        .statuses
                        .insert(name.to_string(), body["status"].clone());
                    // The object as stored, with the status just written.
                    answer = stored[name].clone();
                    answer["status"] = body["status"].clone();
                } else if let Some(object) = uri
                    .rsplit('/')
                    .next()
                    .and_then(|name| stored.get(name))
                    .filter(|_| get)
                {
                    // A read of the object: as stored, with the last status written.
                    answer = object.clone();
                    if let Some(status) = uri
                        .rsplit('/')
                        .next()
                        .and_then(|name| recorded.statuses.get(name))
                    {
                        answer["status"] = status.clone();
                    }
                } else if uri.contains("/events") {
                    let name = body["regarding"]["name"].as_str().unwrap_or("").to_string();
                    recorded.events.entry(name).or_default().push(body);
                }
                reply.send_response(
                    Response::builder()
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap(),
                );
            }
        })
    };
    (Client::new(service, "default"), recorded, task)
}

/// What [`api_server`] recorded, and its task (ended when dropped).
pub struct RecordedHandle {
    pub recorded: Arc<Mutex<Recorded>>,
    pub api: tokio::task::JoinHandle<()>,
}

impl Drop for RecordedHandle {
    fn drop(&mut self) {
        self.api.abort();
    }
}
