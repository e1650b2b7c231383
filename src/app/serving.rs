//! What every serving mode shares: listeners, metrics, the data plane, admin endpoints,
//! providers, and the drain on the way out.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use fleetlb_controller::Providers;
use fleetlb_controller::provider::endpoints::EndpointsProvider;
use fleetlb_controller::provider::local::LocalProvider;
use fleetlb_dataplane::admin::{self, AdminState};
use fleetlb_dataplane::tls::{CertFiles, Certs};
use fleetlb_dataplane::{Dataplane, ProxyConfig, Reuse, RouteTable, access_log};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::AppError;
use crate::cli::ListenArgs;

/// What every serving mode shares: listeners, metrics, data plane, admin endpoints, providers.
pub(super) struct Serving {
    proxy: Proxy,
    pub(super) proxy_addr: SocketAddr,
    pub(super) admin_addr: SocketAddr,
    pub(super) dataplane: Dataplane,
    pub(super) routes: watch::Sender<RouteTable>,
    pub(super) status: watch::Sender<Bytes>,
    pub(super) ready: watch::Sender<bool>,
    pub(super) stop: watch::Sender<bool>,
    /// True from the shutdown signal on: /readyz answers 503 (the proxy stops later).
    unready: watch::Sender<bool>,
    /// From the shutdown signal until the proxy stops accepting.
    pub(super) shutdown_delay: std::time::Duration,
    pub(super) local: Arc<LocalProvider>,
    pub(super) providers: Providers,
    pub(super) metrics: fleetlb_controller::metrics::Metrics,
    /// What the interruption queue said (empty without `--interruption-queue`).
    pub(super) notices: Arc<fleetlb_controller::interruption::Notices>,
    pub(super) tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The HTTPS listener, served until the drain ends.
    tls: Option<tokio::task::JoinHandle<()>>,
    pub(super) tls_addr: Option<SocketAddr>,
}

/// Where the proxy listener is served.
enum Proxy {
    /// On the main runtime (`--proxy-threads 0`).
    Main(TcpListener),
    /// On dedicated threads.
    Threads(Vec<std::thread::JoinHandle<()>>),
}

impl Serving {
    /// Binds, builds and starts everything but the driver; the aws provider exists only with a
    /// `controller_id` (this install's identity).
    pub(super) async fn start(
        listen: &ListenArgs,
        controller_id: Option<String>,
        leader: Option<watch::Receiver<bool>>,
    ) -> Result<Self, AppError> {
        // A certificate that does not load is a configuration error: say so before binding.
        let certs = match (
            &listen.tls_listen,
            listen.tls_cert.len(),
            listen.tls_key.len(),
        ) {
            (None, _, _) => None,
            (Some(_), c, k) if c != k => {
                return Err(AppError::Usage(format!(
                    "--tls-cert and --tls-key come in pairs: {c} certificates, {k} keys"
                )));
            }
            (Some(_), _, _) => {
                let files = listen
                    .tls_cert
                    .iter()
                    .zip(&listen.tls_key)
                    .map(|(cert, key)| CertFiles {
                        cert: cert.clone(),
                        key: key.clone(),
                    })
                    .collect();
                Some(Certs::load(files).map_err(|e| AppError::Usage(format!("--tls-cert: {e}")))?)
            }
        };
        Ok(Self::start_with(listen, controller_id, leader, certs).await?)
    }

    async fn start_with(
        listen: &ListenArgs,
        controller_id: Option<String>,
        leader: Option<watch::Receiver<bool>>,
        certs: Option<Certs>,
    ) -> anyhow::Result<Self> {
        let tls_listener = match (listen.tls_listen, &certs) {
            (Some(addr), Some(_)) => Some(
                fleetlb_dataplane::listen(addr, Reuse::Port)
                    .with_context(|| format!("cannot listen on {addr} (HTTPS)"))?,
            ),
            _ => None,
        };
        let tls_addr = tls_listener.as_ref().map(|l| l.local_addr()).transpose()?;
        let proxy_listener = fleetlb_dataplane::listen(listen.listen, Reuse::Port)
            .with_context(|| format!("cannot listen on {} (proxy)", listen.listen))?;
        let admin_listener = fleetlb_dataplane::listen(listen.admin, Reuse::Address)
            .with_context(|| format!("cannot listen on {} (admin)", listen.admin))?;
        let proxy_addr = proxy_listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;

        let access_log = match listen.access_log.as_deref() {
            None | Some("off") => None,
            Some(name) => {
                let target: access_log::Target = name.parse()?;
                Some(
                    access_log::AccessLog::open(&target, listen.access_log_sample)
                        .with_context(|| format!("cannot open the access log {name}"))?,
                )
            }
        };
        let zone = match listen.zone.as_deref() {
            Some("imds") => imds_zone().await,
            z => z.map(String::from),
        };
        let registry = prometheus::Registry::new();
        let dataplane = Dataplane::new(
            ProxyConfig {
                zone,
                https_port: tls_addr.map(|a| listen.tls_public_port.unwrap_or(a.port())),
                limits: listen.limits.0.clone(),
                trusted_proxies: listen.trusted_proxies.clone(),
                access_log,
                ..ProxyConfig::default()
            },
            &registry,
        )?;
        let (routes, routes_rx) = watch::channel(RouteTable::default());
        let (status, status_rx) =
            watch::channel(Bytes::from_static(b"{\"clusters\":[],\"errors\":[]}"));
        let (ready, ready_rx) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let (unready, unready_rx) = watch::channel(false);

        let exe = std::env::current_exe().context("cannot find the fleetlb executable")?;
        let local = Arc::new(LocalProvider::new(exe));
        let metrics = fleetlb_controller::metrics::Metrics::new(&registry)?;
        let aws = controller_id.map(|id| {
            tracing::info!(controller_id = %id, "aws provider: this install owns instances tagged fleetlb.dev/controller={id}");
            Arc::new(fleetlb_controller::provider::aws::LazyAwsProvider::new(
                listen.ec2_endpoint.clone(),
                id,
                metrics.clone(),
                leader.clone(),
            )) as Arc<dyn fleetlb_controller::provider::Provider>
        });
        let providers = Providers {
            local: Some(local.clone()),
            endpoints: Some(Arc::new(EndpointsProvider)),
            aws,
        };
        let updater = dataplane.watch_routes(routes_rx);
        let proxy = match listen.proxy_threads {
            Some(0) => Proxy::Main(proxy_listener),
            n => Proxy::Threads(
                dataplane
                    .serve_threads(
                        proxy_listener,
                        n.map_or_else(
                            || std::thread::available_parallelism().map_or(1, |n| n.get()),
                            usize::from,
                        ),
                        &stop_rx,
                    )
                    .with_context(|| format!("cannot start proxy threads on {proxy_addr}"))?,
            ),
        };
        let admin_task = tokio::spawn(admin::serve(
            admin_listener,
            Arc::new(AdminState {
                registry,
                dataplane: dataplane.clone(),
                status: status_rx,
                ready: ready_rx,
                draining: unready_rx,
                tls: certs.clone(),
            }),
            // Up through the drain (aborted once the proxy has drained, in `serve`): a draining
            // replica's peers still read its load, and probes see it draining.
            std::future::pending(),
        ));
        let mut tasks = vec![updater, admin_task];
        let notices = Arc::new(fleetlb_controller::interruption::Notices::default());
        if let Some(queue) = listen.interruption_queue.clone() {
            let (notices, metrics, leader) = (notices.clone(), metrics.clone(), leader.clone());
            let endpoint = listen.sqs_endpoint.clone();
            tasks.push(tokio::spawn(async move {
                use fleetlb_controller::interruption;
                let sqs = interruption::client(endpoint.as_deref()).await;
                interruption::run(sqs, queue, notices, metrics, leader).await;
            }));
        }
        let tls = match (tls_listener, certs) {
            (Some(listener), Some(certs)) => {
                tasks.push(certs.watch(dataplane.metrics().clone()));
                let dp = dataplane.clone();
                Some(tokio::spawn(async move {
                    if let Err(e) = dp.serve_tls(listener, &certs, stopped(stop_rx)).await {
                        tracing::error!(error = %e, "the HTTPS listener cannot start");
                    }
                }))
            }
            _ => None,
        };
        Ok(Self {
            notices,
            tls,
            tls_addr,
            proxy,
            proxy_addr,
            admin_addr,
            dataplane,
            routes,
            status,
            ready,
            stop,
            unready,
            shutdown_delay: listen.shutdown_delay.unwrap_or_default(),
            local,
            providers,
            metrics,
            tasks,
        })
    }

    /// Serves until `shutdown` completes or the driver ends on its own (an error), then drains
    /// the proxy, waits for the driver, ends the local instances; returns the driver's result.
    pub(super) async fn serve(
        self,
        driver: tokio::task::JoinHandle<Result<(), AppError>>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), AppError> {
        let stop = self.stop;
        let unready = self.unready;
        let delay = self.shutdown_delay;
        let mut driver = driver;
        let mut ended = None;
        let signal = async {
            tokio::select! {
                () = shutdown => {
                    // Out of the Service's endpoints first; serve on meanwhile, since the
                    // removal takes a while to reach every node and load balancer.
                    let _ = unready.send(true);
                    if !delay.is_zero() {
                        tracing::info!(?delay, "shutting down: /readyz says draining; serving on until the delay is over (a second signal ends it)");
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            () = crate::shutdown_signal() => tracing::info!("second signal: the delay is cut short"),
                        }
                    }
                    tracing::info!("shutting down: no new connections; draining requests in flight");
                }
                r = &mut driver => ended = Some(r),
            }
            let _ = unready.send(true);
            let _ = stop.send(true);
        };
        match self.proxy {
            Proxy::Main(listener) => self.dataplane.serve(listener, signal).await,
            Proxy::Threads(threads) => {
                // The main runtime keeps probes, admin and the controller.
                signal.await;
                let _ = tokio::task::spawn_blocking(move || {
                    for t in threads {
                        let _ = t.join();
                    }
                })
                .await;
            }
        }
        if let Some(tls) = self.tls {
            // Drained alongside the plain listener (same stop signal, same drain timeout).
            let _ = tls.await;
        }
        let result = match ended {
            Some(r) => r,
            None => driver.await,
        }
        .unwrap_or_else(|e| {
            Err(AppError::Failed(anyhow::anyhow!(
                "the controller task failed: {e}"
            )))
        });
        self.local.shutdown().await;
        for t in self.tasks {
            t.abort();
        }
        tracing::info!("stopped");
        result
    }
}

/// Completes once `rx` says stop.
pub(super) async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// The zone the EC2 instance metadata service names (IMDSv2, 1 s timeouts; it honours
/// `AWS_EC2_METADATA_SERVICE_ENDPOINT`). `None`, with a warning, when it cannot be asked: the
/// proxy then routes without a zone preference rather than not at all.
async fn imds_zone() -> Option<String> {
    let client = aws_config::imds::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(1))
        .read_timeout(std::time::Duration::from_secs(1))
        .build();
    match client
        .get("/latest/meta-data/placement/availability-zone")
        .await
    {
        Ok(z) => {
            let z = z.as_ref().trim().to_string();
            tracing::info!(zone = %z, "zone from the instance metadata service");
            Some(z)
        }
        Err(err) => {
            tracing::warn!(%err, "cannot ask the instance metadata service for the zone (from a pod, the node's IMDS hop limit must be 2); routing without a zone preference");
            None
        }
    }
}
