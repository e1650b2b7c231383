//! Wiring: builds the serving stack and a driver from the command line's settings and runs
//! them until a shutdown signal. `main` only parses, calls these and maps the result to an exit
//! code.

mod serving;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use fleetlb_controller::core::Core;
use fleetlb_controller::kubernetes::{self, Context, KubeConfig, Wiring};
use fleetlb_controller::lease::{Elector, LeaseConfig};
use fleetlb_controller::standalone::{Outputs, Standalone, StandaloneConfig};
use tokio::sync::watch;

use crate::cli::{LeaseArgs, ListenArgs};
use serving::{Serving, stopped};

/// Why a serving mode ended other than by a shutdown signal.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Bad configuration (exit 64).
    #[error("{0}")]
    Usage(String),
    /// A service fleetlb needs does not answer (exit 69).
    #[error("{0}")]
    Unavailable(String),
    /// Anything else (exit 1).
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

/// Runs the standalone driver over `dir` (the demo: with its banner) until `shutdown`.
pub async fn run_standalone(
    dir: PathBuf,
    listen: ListenArgs,
    demo: bool,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    if listen.controller_id.is_none()
        && let Some(file) = fleetlb_controller::files::first_aws_object(&dir)
    {
        return Err(AppError::Usage(format!(
            "--controller-id is required: {} uses the aws provider (give this install an id unique in the AWS account and region)",
            file.display()
        )));
    }
    let s = Serving::start(&listen, listen.controller_id.clone(), None).await?;
    let mut cfg = StandaloneConfig::new(dir.clone());
    cfg.core.notices = s.notices.clone();
    let driver = Standalone::new(
        cfg,
        s.providers.clone(),
        s.dataplane.clone(),
        s.metrics.clone(),
    );
    let outputs = Outputs {
        routes: s.routes.clone(),
        status: s.status.clone(),
        ready: s.ready.clone(),
    };
    let stop = stopped(s.stop.subscribe());
    let driver_task = tokio::spawn(async move {
        driver.run(outputs, stop).await;
        Ok(())
    });
    let (proxy_addr, admin_addr) = (s.proxy_addr, s.admin_addr);
    let https = s.tls_addr.map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(proxy = %proxy_addr, admin = %admin_addr, %https, config = %dir.display(), "fleetlb started");
    if demo {
        let (routes, first) = demo_files(&dir);
        let curls: String = routes
            .iter()
            .take(2)
            .map(|r| format!("curl {proxy_addr}{r}   "))
            .collect();
        if let Some(a) = s.tls_addr {
            eprintln!("fleetlb demo: https https://{a}");
        }
        eprintln!(
            "fleetlb demo: proxy http://{proxy_addr}  admin http://{admin_addr}\n  \
             try: {curls}curl {admin_addr}/metrics   fleetlb status --admin {admin_addr}\n  \
             edit {} (replicas) to scale; Ctrl-C stops everything",
            dir.join(first).display()
        );
    }
    s.serve(driver_task, shutdown).await
}

/// The routes of the valid BackendClusters in `dir` and the first such file's name (for the
/// demo's banner: what to curl, what to edit).
fn demo_files(dir: &std::path::Path) -> (Vec<String>, String) {
    use fleetlb_controller::files::{FileText, parse_file};
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut routes = Vec::new();
    let mut first = None;
    for f in &files {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        let valid: Vec<String> = parse_file(f, &FileText::Text(text))
            .outcome
            .into_iter()
            .flatten()
            .filter_map(|d| d.result.ok())
            .map(|bc| bc.spec.route)
            .collect();
        if !valid.is_empty() && first.is_none() {
            first = f.file_name().map(|n| n.to_string_lossy().into_owned());
        }
        routes.extend(valid);
    }
    (routes, first.unwrap_or_else(|| "cluster1.yaml".into()))
}

/// Runs the Kubernetes driver until `shutdown`; fails as unavailable when the API server does
/// not answer or does not serve BackendClusters (after draining like a normal stop).
pub async fn run_kubernetes(
    listen: ListenArgs,
    lease: LeaseArgs,
    peers: Vec<String>,
    sync_period: std::time::Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    // Two clients: the watch client waits as long as a watch lasts; every other call (status
    // writes, Events, the Lease) has a read timeout, so a hung API server fails the call
    // instead of stalling the reconcile or the leader election forever.
    let (client, calls) = match kube::Config::infer()
        .await
        .map_err(|e| e.to_string())
        .and_then(|config| {
            let mut bounded = config.clone();
            bounded.read_timeout = Some(Duration::from_secs(10));
            bounded.reset_reader_on_write = true;
            let watch = kube::Client::try_from(config).map_err(|e| e.to_string())?;
            let calls = kube::Client::try_from(bounded).map_err(|e| e.to_string())?;
            Ok((watch, calls))
        }) {
        Ok(c) => c,
        Err(e) => {
            return Err(AppError::Usage(format!(
                "no Kubernetes configuration ({e}); run in a pod, or set KUBECONFIG"
            )));
        }
    };
    let controller_id = match listen.controller_id.clone() {
        Some(id) => id,
        None => match kubernetes::controller_id_from_cluster(calls.clone()).await {
            Ok(id) => id,
            // Refused (RBAC, no such namespace): configuration.
            Err(kube::Error::Api(e)) if e.code < 500 => {
                return Err(AppError::Usage(format!(
                    "cannot derive the controller id from namespace kube-system ({e}); pass --controller-id or allow get on namespaces/kube-system"
                )));
            }
            // No answer: the API server is unavailable.
            Err(e) => {
                return Err(AppError::Unavailable(format!(
                    "the API server does not answer (reading namespace kube-system for the controller id: {e})"
                )));
            }
        },
    };
    let identity = lease.identity.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| format!("fleetlb-{}", std::process::id()))
    });
    let no_leader_election = lease.no_leader_election;
    let (leader_tx, leader_rx) = watch::channel(no_leader_election);
    // Every RunInstances, TerminateInstances and DeleteTags attempt is sent only while this
    // replica leads (checked right before the request goes out).
    let s = Serving::start(&listen, Some(controller_id), Some(leader_rx.clone())).await?;
    let metrics = s.metrics.clone();
    let mut leader_gauge = leader_rx.clone();
    s.metrics.leader.set(i64::from(lease.no_leader_election));
    let gauge = tokio::spawn(async move {
        while leader_gauge.changed().await.is_ok() {
            metrics.leader.set(i64::from(*leader_gauge.borrow()));
        }
    });
    // The Lease is released only after the controller has stopped (client-go's
    // ReleaseOnCancel): no reconcile still runs when the next leader starts.
    let (lease_stop, lease_stop_rx) = watch::channel(false);
    let mut term = fleetlb_controller::lease::Term::unbounded();
    let elect = (!lease.no_leader_election).then(|| {
        let api = kube::Api::namespaced(calls.clone(), &lease.lease_namespace);
        let elector = Elector::new(
            api,
            LeaseConfig::new(lease.lease_namespace, lease.lease_name, identity.clone()),
        );
        term = elector.term();
        // Ends after releasing the Lease on shutdown, so a rolling update hands over at once.
        tokio::spawn(fleetlb_controller::lease::run(
            elector,
            leader_tx,
            stopped(lease_stop_rx),
        ))
    });
    let reporter = kube::runtime::events::Reporter {
        controller: "fleetlb".into(),
        instance: Some(identity),
    };
    // Every launch, termination and release re-checks leadership right before the call.
    let mut cfg = KubeConfig::default();
    cfg.core.sole_proxy = no_leader_election;
    cfg.core.peers = peers;
    cfg.core.notices = s.notices.clone();
    cfg.resync = sync_period;
    let core = Core::new(
        s.providers
            .clone()
            .leader_only(leader_rx.clone(), term.clone()),
        s.dataplane.clone(),
        s.metrics.clone(),
        cfg.core.clone(),
    );
    let wiring = Wiring {
        client: calls,
        reporter,
        leader: leader_rx,
        term,
        routes: s.routes.clone(),
        status: s.status.clone(),
    };
    let ready = s.ready.clone();
    let stop = stopped(s.stop.subscribe());
    let (proxy_addr, admin_addr) = (s.proxy_addr, s.admin_addr);
    let driver = tokio::spawn(async move {
        let r = kubernetes::run(
            move |store| Context::new(wiring, core, store, cfg),
            client,
            ready,
            stop,
        )
        .await;
        if let Some(elect) = elect {
            if r.is_ok() {
                // Shutting down: release the Lease, under its own deadline (the renew
                // deadline); this only bounds the wait.
                let _ = lease_stop.send(true);
                let _ = tokio::time::timeout(Duration::from_secs(15), elect).await;
            } else {
                elect.abort();
            }
        }
        gauge.abort();
        r.map_err(|e| {
            AppError::Unavailable(format!(
                "cannot watch BackendClusters ({e}); is the CRD installed (kubectl apply -f manifests/crd.yaml)?"
            ))
        })
    });
    let https = s.tls_addr.map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(proxy = %proxy_addr, admin = %admin_addr, %https, "fleetlb started in Kubernetes mode");
    s.serve(driver, shutdown).await
}

/// The built-in demo clusters, for `fleetlb demo` run outside a checkout.
pub fn write_builtin_examples() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("fleetlb-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("cluster1.yaml"),
        include_str!("../../examples/cluster1.yaml"),
    )?;
    std::fs::write(
        dir.join("cluster2.yaml"),
        include_str!("../../examples/cluster2.yaml"),
    )?;
    eprintln!(
        "fleetlb: no ./examples here; using the built-in demo clusters in {}",
        dir.display()
    );
    Ok(dir)
}
