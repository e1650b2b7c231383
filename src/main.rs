#![forbid(unsafe_code)]
//! `fleetlb`: the binary. CLI -> config -> build -> run until a signal. All logic lives in the
//! workspace crates; this file only wires them.

mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use fleetlb_controller::Providers;
use fleetlb_controller::backend::{self, BackendConfig, Profile};
use fleetlb_controller::fixed::StaticProvider;
use fleetlb_controller::local::LocalProvider;
use fleetlb_controller::standalone::{Outputs, Standalone, StandaloneConfig};
use fleetlb_dataplane::admin::{self, AdminState};
use fleetlb_dataplane::{Dataplane, ProxyConfig, RouteTable};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Exit code for bad flags and bad configuration (BSD `EX_USAGE`).
const EX_USAGE: u8 = 64;
/// Exit code when a service fleetlb needs (the API server) does not answer (`EX_UNAVAILABLE`).
const EX_UNAVAILABLE: u8 = 69;

/// Latency-aware load balancer and EC2 fleet controller.
///
/// fleetlb keeps fleets of instances described by BackendCluster objects running, and balances
/// HTTP requests across them by path prefix, sending each request to the instance that answers
/// fastest without herding.
#[derive(Parser)]
#[command(name = "fleetlb", version, propagate_version = true)]
struct Cli {
    /// Log format on stderr (`RUST_LOG` sets the level, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole loop on this machine, no cloud, no cluster: BackendClusters from
    /// `examples/`, instances as local `fleetlb backend` processes, the proxy in front.
    ///
    /// Try `curl localhost:8000/cluster1`, `curl localhost:9090/metrics`, `fleetlb status`, and
    /// edit `replicas` in examples/cluster1.yaml while it runs.
    Demo {
        /// Directory of BackendCluster YAML files (watched for edits, additions, deletions).
        /// When `examples` does not exist here, the built-in demo clusters are written to a
        /// temporary directory and used instead.
        #[arg(long, default_value = "examples")]
        config: PathBuf,
        #[command(flatten)]
        listen: ListenArgs,
    },
    /// Run the controller and proxy from BackendCluster YAML files in a directory, without
    /// Kubernetes. Any provider works: local, static, aws.
    Standalone {
        /// Directory of BackendCluster YAML files (watched for edits, additions, deletions).
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        listen: ListenArgs,
    },
    /// Run in Kubernetes: watch BackendCluster objects through the API server.
    ///
    /// Every replica serves traffic; the one holding the leader-election Lease also launches and
    /// terminates instances and writes status.
    Run {
        #[command(flatten)]
        listen: ListenArgs,
        #[command(flatten)]
        lease: LeaseArgs,
    },
    /// Print the BackendCluster CustomResourceDefinition (manifests/crd.yaml).
    Crd,
    /// Print the IAM policy the aws provider needs, scoped to one install's controller id
    /// (manifests/iam-policy.json is this with the placeholder id CONTROLLER_ID).
    ///
    /// In Kubernetes the id defaults to fleetlb-<UID of the kube-system namespace>:
    /// `fleetlb iam-policy --controller-id fleetlb-$(kubectl get ns kube-system -o jsonpath='{.metadata.uid}')`
    IamPolicy {
        /// The install's controller id, as given to (or derived by) `fleetlb run`/`standalone`.
        #[arg(long, value_parser = parse_controller_id)]
        controller_id: String,
        /// ARN partition: aws, aws-cn or aws-us-gov.
        #[arg(long, default_value = "aws", value_parser = ["aws", "aws-cn", "aws-us-gov"])]
        partition: String,
        /// Name of the IAM role instances are launched with (spec.provider.aws.iamInstanceProfile).
        #[arg(long, default_value = "fleetlb-instance", value_parser = parse_role_name)]
        instance_role: String,
    },
    /// Print the clusters of a running fleetlb as a table, like `kubectl get bc`.
    Status {
        /// Admin address of the running fleetlb.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
        /// Print the raw JSON of `/status` instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Load-test a running load balancer, like the original experiment: `-n` requests with `-c`
    /// connections per path (closed loop), or `--rate` requests/s for `--duration` (open loop,
    /// latency from the scheduled send time). Prints a table per path and per instance; `--out`
    /// writes one CSV per path and summary.json; `--compare A.json B.json` compares two runs.
    /// Exits 1 when the error rate exceeds `--max-error-rate`.
    Bench(BenchArgs),
    /// Serve as one demo instance, like the original experiment's FastAPI app: `GET /health`,
    /// and JSON naming the instance and cluster on every other path.
    Backend {
        /// Instance id to report.
        #[arg(long)]
        id: String,
        /// Cluster name to report.
        #[arg(long)]
        cluster: String,
        /// Port to listen on, on 127.0.0.1 (0 picks a free one; the chosen address is printed).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Instance type whose profile (service time, concurrency) to mimic, e.g. t2.micro.
        #[arg(long, default_value = "t2.micro")]
        profile: String,
        /// Override the profile's service time, in milliseconds.
        #[arg(long)]
        latency_ms: Option<u64>,
        /// Override the profile's concurrency.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        concurrency: Option<u32>,
        /// Exit (after draining) when standard input reaches end-of-file; the local provider
        /// uses this so instances never outlive fleetlb.
        #[arg(long)]
        exit_on_stdin_eof: bool,
    },
}

#[derive(Args, Clone)]
struct BenchArgs {
    /// Base URL of the load balancer.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    target: String,
    /// Path to load (repeat for several; each gets the full load in turn).
    #[arg(long = "path", required_unless_present = "compare")]
    paths: Vec<String>,
    /// Requests per path (closed loop, unless --duration is given).
    #[arg(short = 'n', long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    requests: u64,
    /// Connections (concurrent requests).
    #[arg(short = 'c', long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    concurrency: u32,
    /// Open loop: requests per second per path.
    #[arg(long)]
    rate: Option<f64>,
    /// Run time per path, e.g. 30s.
    #[arg(long, value_parser = fleetlb_bench::parse_duration)]
    duration: Option<Duration>,
    /// Open a new connection for every request.
    #[arg(long)]
    no_keepalive: bool,
    /// Per-request timeout, e.g. 5s.
    #[arg(long, value_parser = fleetlb_bench::parse_duration, default_value = "10s")]
    timeout: Duration,
    /// Directory for per-path CSV files and summary.json.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Highest tolerated share of failed requests (transport errors, non-2xx/3xx), 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    max_error_rate: f64,
    /// Compare two summary.json files instead of running.
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    compare: Option<Vec<PathBuf>>,
}

#[derive(Args, Clone)]
struct ListenArgs {
    /// Proxy listen address.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Admin listen address: /metrics /healthz /readyz /status /debug/endpoints.
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin: SocketAddr,
    /// EC2 endpoint URL for the aws provider (e.g. a moto_server); AWS_ENDPOINT_URL works too.
    /// Region and credentials come from the standard AWS chain.
    #[arg(long, env = "FLEETLB_EC2_ENDPOINT")]
    ec2_endpoint: Option<String>,
    /// Identity of this install, tagged on every instance it launches
    /// (`fleetlb.dev/controller`); instances of other ids are never touched. Must be unique per
    /// AWS account and region. `run` derives it from the cluster (fleetlb-<UID of the
    /// kube-system namespace>) when not given; `standalone` requires it for the aws provider.
    #[arg(long, env = "FLEETLB_CONTROLLER_ID", value_parser = parse_controller_id)]
    controller_id: Option<String>,
    /// Proxy threads, each with its own single-threaded runtime, listener (SO_REUSEPORT) and
    /// upstream pool (default: one per core). 0 serves the proxy on the main runtime instead.
    #[arg(long, value_parser = clap::value_parser!(u16).range(0..=256))]
    proxy_threads: Option<u16>,
}

#[derive(Args, Clone)]
struct LeaseArgs {
    /// Namespace of the leader-election Lease: the controller's own.
    #[arg(long, env = "POD_NAMESPACE", default_value = "fleetlb-system")]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "fleetlb-leader")]
    lease_name: String,
    /// This replica's identity in the Lease and in Events (default: the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Act without leader election. Only safe with a single replica.
    #[arg(long)]
    no_leader_election: bool,
}

fn parse_controller_id(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if ok {
        Ok(s.to_string())
    } else {
        Err("must be 1-63 letters, digits, '-', '.' or '_'".into())
    }
}

/// An IAM role name with an optional path (`fleetlb-instance`, `teams/web/fleetlb-instance`).
fn parse_role_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 512
        && !s.starts_with('/')
        && !s.ends_with('/')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-/".contains(&b));
    if ok {
        Ok(s.to_string())
    } else {
        Err("must be an IAM role name, optionally with its path (letters, digits, +=,.@_-/)".into())
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleetlb: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fleetlb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Help and version go to stdout with exit 0; any other parse error is one line and exit 64.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(EX_USAGE)
        }
        _ => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("fleetlb: {first} (see fleetlb --help)");
            ExitCode::from(EX_USAGE)
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Crd => {
            print!("{}", fleetlb_crds::crd_yaml());
            Ok(ExitCode::SUCCESS)
        }
        Command::IamPolicy {
            controller_id,
            partition,
            instance_role,
        } => {
            print!(
                "{}",
                fleetlb_controller::iam::policy_json(&fleetlb_controller::iam::PolicyOptions {
                    controller_id,
                    partition,
                    instance_role,
                })
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { admin, json } => status::print(admin, json).await,
        Command::Bench(args) => bench(args).await,
        Command::Backend {
            id,
            cluster,
            port,
            profile,
            latency_ms,
            concurrency,
            exit_on_stdin_eof,
        } => {
            let mut p = Profile::for_instance_type(&profile);
            if let Some(ms) = latency_ms {
                p.latency = Duration::from_millis(ms);
            }
            if let Some(c) = concurrency {
                p.concurrency = c as usize;
            }
            let listener = bind(SocketAddr::from(([127, 0, 0, 1], port)), "backend").await?;
            let addr = listener.local_addr()?;
            // The local provider waits for this line before calling the instance running.
            println!("ready {addr}");
            let cfg = BackendConfig {
                id,
                cluster,
                instance_type: profile,
                profile: p,
            };
            let stop = async move {
                if exit_on_stdin_eof {
                    tokio::select! {
                        () = stdin_closed() => {}
                        () = shutdown_signal() => {}
                    }
                } else {
                    shutdown_signal().await
                }
            };
            backend::serve(listener, cfg, stop).await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { config, listen } => {
            let dir = if config.is_dir() || config != std::path::Path::new("examples") {
                config
            } else {
                write_builtin_examples()?
            };
            serve_standalone(dir, listen, true).await
        }
        Command::Standalone { config, listen } => serve_standalone(config, listen, false).await,
        Command::Run { listen, lease } => serve_kubernetes(listen, lease).await,
    }
}

async fn bench(a: BenchArgs) -> anyhow::Result<ExitCode> {
    if let Some(files) = &a.compare {
        let read = |p: &PathBuf| -> anyhow::Result<fleetlb_bench::Summary> {
            let text = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
            serde_json::from_slice(&text)
                .with_context(|| format!("{} is not a fleetlb bench summary", p.display()))
        };
        print!(
            "{}",
            fleetlb_bench::compare(&read(&files[0])?, &read(&files[1])?)
        );
        return Ok(ExitCode::SUCCESS);
    }
    if a.rate.is_some_and(|r| !(0.001..=10_000_000.0).contains(&r)) {
        eprintln!("fleetlb: --rate must be between 0.001 and 10000000 requests per second");
        return Ok(ExitCode::from(EX_USAGE));
    }
    if !(0.0..=1.0).contains(&a.max_error_rate) {
        eprintln!("fleetlb: --max-error-rate must be between 0 and 1");
        return Ok(ExitCode::from(EX_USAGE));
    }
    if !(a.target.starts_with("http://") && a.target.parse::<http::Uri>().is_ok()) {
        eprintln!("fleetlb: --target {:?} must be an http:// URL", a.target);
        return Ok(ExitCode::from(EX_USAGE));
    }
    if let Some(p) = a.paths.iter().find(|p| !p.starts_with('/')) {
        eprintln!("fleetlb: --path {p:?} must start with /");
        return Ok(ExitCode::from(EX_USAGE));
    }
    let cfg = fleetlb_bench::BenchConfig {
        target: a.target,
        paths: a.paths,
        requests: if a.duration.is_some() && a.rate.is_none() {
            None
        } else {
            Some(a.requests)
        },
        concurrency: a.concurrency as usize,
        rate: a.rate,
        duration: a.duration,
        keepalive: !a.no_keepalive,
        timeout: a.timeout,
        out: a.out.clone(),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let summary = fleetlb_bench::run(&cfg).await?;
    print!("{}", fleetlb_bench::report::table(&summary));
    if let Some(dir) = &a.out {
        println!(
            "\nwrote {} (CSV per path, summary.json, PNG charts)",
            dir.display()
        );
    }
    let rate = summary.error_rate();
    if rate > a.max_error_rate {
        eprintln!(
            "fleetlb bench: error rate {:.4} exceeds --max-error-rate {}",
            rate, a.max_error_rate
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    fleetlb_dataplane::listen(addr, what == "proxy")
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

/// The built-in demo clusters, for `fleetlb demo` run outside a checkout.
fn write_builtin_examples() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("fleetlb-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("cluster1.yaml"),
        include_str!("../examples/cluster1.yaml"),
    )?;
    std::fs::write(
        dir.join("cluster2.yaml"),
        include_str!("../examples/cluster2.yaml"),
    )?;
    eprintln!(
        "fleetlb: no ./examples here; using the built-in demo clusters in {}",
        dir.display()
    );
    Ok(dir)
}

/// What every serving mode shares: listeners, metrics, data plane, admin endpoints, providers.
struct Serving {
    proxy: Proxy,
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    dataplane: Dataplane,
    routes: watch::Sender<RouteTable>,
    status: watch::Sender<Bytes>,
    ready: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    local: Arc<LocalProvider>,
    providers: Providers,
    metrics: fleetlb_controller::metrics::Metrics,
    tasks: Vec<tokio::task::JoinHandle<()>>,
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
    async fn start(
        listen: &ListenArgs,
        controller_id: Option<String>,
        leader: Option<watch::Receiver<bool>>,
    ) -> anyhow::Result<Self> {
        let proxy_listener = bind(listen.listen, "proxy").await?;
        let admin_listener = bind(listen.admin, "admin").await?;
        let proxy_addr = proxy_listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;

        let registry = prometheus::Registry::new();
        let dataplane = Dataplane::new(ProxyConfig::default(), &registry)?;
        let (routes, routes_rx) = watch::channel(RouteTable::default());
        let (status, status_rx) =
            watch::channel(Bytes::from_static(b"{\"clusters\":[],\"errors\":[]}"));
        let (ready, ready_rx) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);

        let exe = std::env::current_exe().context("cannot find the fleetlb executable")?;
        let local = Arc::new(LocalProvider::new(exe));
        let metrics = fleetlb_controller::metrics::Metrics::new(&registry)?;
        let aws = controller_id.map(|id| {
            tracing::info!(controller_id = %id, "aws provider: this install owns instances tagged fleetlb.dev/controller={id}");
            Arc::new(fleetlb_controller::aws::LazyAwsProvider::new(
                listen.ec2_endpoint.clone(),
                id,
                metrics.clone(),
                leader.clone(),
            )) as Arc<dyn fleetlb_controller::provider::Provider>
        });
        let providers = Providers {
            local: Some(local.clone()),
            fixed: Some(Arc::new(StaticProvider)),
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
            }),
            stopped(stop_rx),
        ));
        Ok(Self {
            proxy,
            proxy_addr,
            admin_addr,
            dataplane,
            routes,
            status,
            ready,
            stop,
            local,
            providers,
            metrics,
            tasks: vec![updater, admin_task],
        })
    }

    /// Serves until SIGTERM/SIGINT, then drains and waits for `driver`.
    async fn serve(self, driver: tokio::task::JoinHandle<()>) -> anyhow::Result<ExitCode> {
        let stop = self.stop;
        let signal = async move {
            shutdown_signal().await;
            tracing::info!("shutting down: draining requests in flight");
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
        let _ = driver.await;
        self.local.shutdown().await;
        for t in self.tasks {
            t.abort();
        }
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    }
}

async fn serve_standalone(
    dir: PathBuf,
    listen: ListenArgs,
    demo: bool,
) -> anyhow::Result<ExitCode> {
    if !dir.is_dir() {
        eprintln!("fleetlb: --config {}: not a directory", dir.display());
        return Ok(ExitCode::from(EX_USAGE));
    }
    if listen.controller_id.is_none()
        && let Some(file) = fleetlb_controller::files::first_aws_object(&dir)
    {
        eprintln!(
            "fleetlb: --controller-id is required: {} uses the aws provider (give this install an id unique in the AWS account and region)",
            file.display()
        );
        return Ok(ExitCode::from(EX_USAGE));
    }
    let s = Serving::start(&listen, listen.controller_id.clone(), None).await?;
    let driver = Standalone::new(
        StandaloneConfig::new(dir.clone()),
        s.providers.clone(),
        s.dataplane.clone(),
        s.metrics.clone(),
    );
    let driver_task = tokio::spawn(driver.run(
        Outputs {
            routes: s.routes.clone(),
            status: s.status.clone(),
            ready: s.ready.clone(),
        },
        stopped(s.stop.subscribe()),
    ));
    let (proxy_addr, admin_addr) = (s.proxy_addr, s.admin_addr);
    tracing::info!(proxy = %proxy_addr, admin = %admin_addr, config = %dir.display(), "fleetlb started");
    if demo {
        eprintln!(
            "fleetlb demo: proxy http://{proxy_addr}  admin http://{admin_addr}\n  \
             try: curl {proxy_addr}/cluster1   curl {proxy_addr}/cluster2   curl {admin_addr}/metrics   fleetlb status --admin {admin_addr}\n  \
             edit {}/cluster1.yaml (replicas) to scale; Ctrl-C stops everything",
            dir.display()
        );
    }
    s.serve(driver_task).await
}

async fn serve_kubernetes(listen: ListenArgs, lease: LeaseArgs) -> anyhow::Result<ExitCode> {
    use fleetlb_controller::kubernetes::{self, Context, KubeConfig};
    use fleetlb_controller::lease::{Elector, LeaseConfig};
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
            eprintln!(
                "fleetlb: no Kubernetes configuration ({e}); run in a pod, or set KUBECONFIG"
            );
            return Ok(ExitCode::from(EX_USAGE));
        }
    };
    let controller_id = match listen.controller_id.clone() {
        Some(id) => id,
        None => match kubernetes::controller_id_from_cluster(calls.clone()).await {
            Ok(id) => id,
            // Refused (RBAC, no such namespace): configuration.
            Err(kube::Error::Api(e)) if e.code < 500 => {
                eprintln!(
                    "fleetlb: cannot derive the controller id from namespace kube-system ({e}); pass --controller-id or allow get on namespaces/kube-system"
                );
                return Ok(ExitCode::from(EX_USAGE));
            }
            // No answer: the API server is unavailable.
            Err(e) => {
                eprintln!(
                    "fleetlb: the API server does not answer (reading namespace kube-system for the controller id: {e})"
                );
                return Ok(ExitCode::from(EX_UNAVAILABLE));
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
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(async move {
        while leader_gauge.changed().await.is_ok() {
            metrics.leader.set(i64::from(*leader_gauge.borrow()));
        }
    }));
    if !lease.no_leader_election {
        let api = kube::Api::namespaced(calls.clone(), &lease.lease_namespace);
        let elector = Elector::new(
            api,
            LeaseConfig::new(lease.lease_namespace, lease.lease_name, identity.clone()),
        );
        tasks.push(tokio::spawn(fleetlb_controller::lease::run(
            elector,
            leader_tx,
            stopped(s.stop.subscribe()),
        )));
    }
    let reporter = kube::runtime::events::Reporter {
        controller: "fleetlb".into(),
        instance: Some(identity),
    };
    // Every launch, termination and release re-checks leadership right before the call.
    let (providers, dataplane, metrics, routes) = (
        s.providers.clone().leader_only(leader_rx.clone()),
        s.dataplane.clone(),
        s.metrics.clone(),
        s.routes.clone(),
    );
    let status = s.status.clone();
    let ctx_client = calls;
    let ready = s.ready.clone();
    let shutdown = stopped(s.stop.subscribe());
    let (proxy_addr, admin_addr) = (s.proxy_addr, s.admin_addr);
    let driver = tokio::spawn(async move {
        let r = kubernetes::run(
            move |store| {
                Context::new(
                    ctx_client,
                    reporter,
                    providers,
                    dataplane,
                    metrics,
                    leader_rx,
                    store,
                    routes,
                    status,
                    KubeConfig {
                        sole_proxy: no_leader_election,
                        ..KubeConfig::default()
                    },
                )
            },
            client,
            ready,
            shutdown,
        )
        .await;
        if r.is_err() {
            std::process::exit(i32::from(EX_UNAVAILABLE));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    tracing::info!(proxy = %proxy_addr, admin = %admin_addr, "fleetlb started in Kubernetes mode");
    s.serve(driver).await
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Completes when standard input reaches end-of-file (the parent closed the pipe or died).
async fn stdin_closed() {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 256];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
