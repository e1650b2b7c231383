//! The `local` provider: "instances" are `fleetlb backend` child processes on 127.0.0.1.
//!
//! Each launch gives the instance an EC2-style id and spawns
//! `fleetlb backend --id i-… --cluster … --port 0 --profile <instanceType> --exit-on-stdin-eof`:
//! the child binds a port of its own choosing and prints it (`ready 127.0.0.1:PORT`), so two
//! launches can never be handed the same port. The instance is `pending` (without an address)
//! until it prints its ready line, `running` at that address after, `shutting-down`
//! once terminated and `terminated` when the process has exited (reported once, then forgotten).
//!
//! Children never outlive fleetlb, even on SIGKILL: each child's stdin is a pipe whose only
//! writer is this process, and the backend exits when it reads end-of-file. The kernel closes
//! the pipe when fleetlb dies however it dies; no `unsafe` parent-death signal is needed.
//! Terminating an instance closes its pipe the same way, so it drains and exits cleanly.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use fleetlb_crds::{BackendCluster, ProviderSpec};
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, ChildStdin, Command};

use crate::Error;
use crate::error::{ErrorClass, Operation};
use crate::provider::{Instance, InstanceState, Launch, LaunchRequest, Provider, ProviderKind};

struct Proc {
    meta: Instance,
    child: Child,
    stdin: Option<ChildStdin>,
    /// The address the child printed once it listens.
    ready: Arc<OnceLock<SocketAddr>>,
    terminating_since: Option<std::time::Instant>,
}

/// Launches instances as local child processes.
pub struct LocalProvider {
    exe: PathBuf,
    procs: Mutex<HashMap<String, Proc>>,
    /// Orphaned instances: no longer listed, still ended when fleetlb stops.
    released: Mutex<Vec<Proc>>,
}

/// Time a terminated instance gets to drain before it is killed.
const KILL_AFTER: Duration = Duration::from_secs(5);

impl LocalProvider {
    /// A provider that runs `exe backend …` (normally the `fleetlb` binary itself).
    pub fn new(exe: PathBuf) -> Self {
        Self {
            exe,
            procs: Mutex::new(HashMap::new()),
            released: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Proc>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Process ids of the live children, for tests and diagnostics.
    pub fn pids(&self) -> Vec<u32> {
        self.lock().values().filter_map(|p| p.child.id()).collect()
    }

    /// Terminates every child and waits (up to a few seconds) for them to exit.
    pub async fn shutdown(&self) {
        let mut children: Vec<Child> = {
            let mut procs = self.lock();
            let mut released = self.released.lock().unwrap_or_else(|p| p.into_inner());
            procs
                .drain()
                .map(|(_, p)| p)
                .chain(released.drain(..))
                .map(|mut p| {
                    p.stdin.take();
                    p.child
                })
                .collect()
        };
        let deadline = tokio::time::Instant::now() + KILL_AFTER;
        for child in &mut children {
            if tokio::time::timeout_at(deadline, child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }

    fn spawn(&self, req: &LaunchRequest) -> Result<Instance, Error> {
        let latency = match &req.provider {
            ProviderSpec::Local(l) => l.latency_ms,
            _ => None,
        };
        let id = format!("i-0{:015x}", fastrand::u64(..) >> 4);
        let mut cmd = Command::new(&self.exe);
        cmd.arg("backend")
            .args(["--id", &id])
            .args(["--cluster", &req.owner.to_string()])
            .args(["--port", "0"])
            .args(["--profile", &req.instance_type])
            .arg("--exit-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if req.grpc {
            cmd.arg("--grpc");
        }
        if let Some(ms) = latency {
            cmd.args(["--latency-ms", &ms.to_string()]);
        }
        let mut child = cmd.spawn().map_err(|e| {
            Error::new(
                ProviderKind::Local,
                Operation::Launch,
                ErrorClass::Other,
                format!("cannot start {}: {e}", self.exe.display()),
            )
        })?;
        let ready = Arc::new(OnceLock::new());
        if let Some(out) = child.stdout.take() {
            let ready = ready.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(addr) = line.strip_prefix("ready ").and_then(|a| a.parse().ok()) {
                        let _ = ready.set(addr);
                    }
                }
            });
        }
        let meta = Instance {
            id: id.clone(),
            owner: req.owner.clone(),
            owner_uid: req.owner_uid.clone(),
            slot: req.slot,
            attempt: req.attempt,
            address: None,
            state: InstanceState::Pending,
            instance_type: req.instance_type.clone(),
            spec_hash: req.spec_hash.clone(),
            launched_at: SystemTime::now(),
            launched_as: None,
            client_token: Some(req.token()),
            provider: ProviderKind::Local,
        };
        let stdin = child.stdin.take();
        self.lock().insert(
            id,
            Proc {
                meta: meta.clone(),
                child,
                stdin,
                ready,
                terminating_since: None,
            },
        );
        Ok(meta)
    }
}

impl Provider for LocalProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Local
    }

    fn list<'a>(
        &'a self,
        _clusters: &'a [Arc<BackendCluster>],
    ) -> BoxFuture<'a, Result<Vec<Instance>, Error>> {
        async move {
            let mut procs = self.lock();
            let mut out = Vec::with_capacity(procs.len());
            let mut gone = Vec::new();
            for (id, p) in procs.iter_mut() {
                let exited = matches!(p.child.try_wait(), Ok(Some(_)) | Err(_));
                let mut meta = p.meta.clone();
                meta.address = p.ready.get().copied();
                meta.state = if exited {
                    gone.push(id.clone());
                    InstanceState::Terminated
                } else if let Some(since) = p.terminating_since {
                    if since.elapsed() > KILL_AFTER {
                        let _ = p.child.start_kill();
                    }
                    InstanceState::ShuttingDown
                } else if meta.address.is_some() {
                    InstanceState::Running
                } else {
                    InstanceState::Pending
                };
                out.push(meta);
            }
            for id in gone {
                procs.remove(&id);
            }
            Ok(out)
        }
        .boxed()
    }

    fn launch<'a>(&'a self, req: &'a LaunchRequest) -> BoxFuture<'a, Result<Launch, Error>> {
        async move { self.spawn(req).map(|i| Launch::Made(Box::new(i))) }.boxed()
    }

    fn release<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), Error>> {
        async move {
            let mut procs = self.lock();
            let mut released = self.released.lock().unwrap_or_else(|p| p.into_inner());
            for id in ids {
                if let Some(p) = procs.remove(id) {
                    released.push(p);
                }
            }
            Ok(())
        }
        .boxed()
    }

    fn terminate<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), Error>> {
        async move {
            let mut procs = self.lock();
            for id in ids {
                if let Some(p) = procs.get_mut(id) {
                    // Closing stdin asks the backend to drain and exit.
                    p.stdin.take();
                    p.terminating_since
                        .get_or_insert_with(std::time::Instant::now);
                }
            }
            Ok(())
        }
        .boxed()
    }
}
