//! The command line: every flag, its default and its check. A bad value is refused here, by
//! clap, with one line naming the flag (exit code 64); nothing after parsing re-validates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Latency-aware load balancer and EC2 fleet controller.
///
/// fleetlb keeps fleets of instances described by BackendCluster objects running, and balances
/// HTTP requests across them by path prefix, sending each request to the instance that answers
/// fastest without herding.
#[derive(Parser)]
#[command(name = "fleetlb", version, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr (`RUST_LOG` sets the level, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the whole loop on this machine, no cloud, no cluster: BackendClusters from
    /// `examples/`, instances as local `fleetlb backend` processes, the proxy in front.
    ///
    /// Try `curl localhost:8000/cluster1`, `curl localhost:9090/metrics`, `fleetlb status`, and
    /// edit `replicas` in examples/cluster1.yaml while it runs.
    Demo {
        /// Directory of BackendCluster YAML files (watched for edits, additions, deletions).
        /// When `examples` does not exist here, the built-in demo clusters are written to a
        /// temporary directory and used instead.
        #[arg(long, default_value = "examples", value_parser = parse_demo_dir)]
        config: PathBuf,
        #[command(flatten)]
        listen: ListenArgs,
    },
    /// Run the controller and proxy from BackendCluster YAML files in a directory, without
    /// Kubernetes. Any provider works: local, static, aws.
    Standalone {
        /// Directory of BackendCluster YAML files (watched for edits, additions, deletions).
        #[arg(long, value_parser = parse_dir)]
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
        /// The other replicas' admin ports, `host:port` (repeatable or comma-separated; a name
        /// stands for every address it resolves to, e.g. the headless Service
        /// `fleetlb-peers:9090`): the autoscaler sums their load with this replica's.
        #[arg(long, value_delimiter = ',', value_parser = parse_peer)]
        peers: Vec<String>,
        /// How often a settled BackendCluster is reconciled although nothing about it changed
        /// (its instances are listed again, instances that died replaced, latency figures in
        /// status refreshed); at least 5s. Changes to the object and to its endpoints' health
        /// are acted on at once whatever this is; orphaned instances are swept at least every
        /// 30s.
        #[arg(long, default_value = "30s", value_parser = parse_sync_period)]
        sync_period: std::time::Duration,
    },
    /// Check BackendCluster files without serving them, with the validator `standalone` and
    /// the CRD's schema share: every problem is printed with its file, object and field.
    /// Exits 0 when every object is valid, 1 otherwise.
    ///
    /// A directory stands for its `.yaml`/`.yml` files. Two objects with one name, or claiming
    /// one route (unless both set `weight`), are problems too.
    Validate {
        /// Files or directories.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
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
        /// The --interruption-queue (name or URL) the controller reads: adds the SQS
        /// permissions to receive and delete its messages, on that queue only.
        #[arg(long, value_parser = parse_queue)]
        interruption_queue: Option<String>,
    },
    /// Print the clusters of a running fleetlb as a table, like `kubectl get bc`.
    Status {
        /// Admin address of the running fleetlb (`:9090` and `localhost:9090` mean 127.0.0.1).
        #[arg(long, default_value = "127.0.0.1:9090", value_parser = parse_connect_addr)]
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
    Backend(BackendArgs),
}

/// `fleetlb backend`.
#[derive(Args, Clone)]
pub struct BackendArgs {
    /// Instance id to report.
    #[arg(long)]
    pub id: String,
    /// Cluster name to report.
    #[arg(long)]
    pub cluster: String,
    /// Port to listen on, on 127.0.0.1 (0 picks a free one; the chosen address is printed).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Instance type whose profile (service time, concurrency) to mimic, e.g. t2.micro.
    #[arg(long, default_value = "t2.micro")]
    pub profile: String,
    /// Override the profile's service time, in milliseconds.
    #[arg(long)]
    pub latency_ms: Option<u64>,
    /// Override the profile's concurrency.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: Option<u32>,
    /// Exit (after draining) when standard input reaches end-of-file; the local provider
    /// uses this so instances never outlive fleetlb.
    #[arg(long)]
    pub exit_on_stdin_eof: bool,
    /// Serve gRPC over HTTP/2 too: `fleetlb.demo.Echo` (examples/grpc/echo.proto) and
    /// `grpc.health.v1.Health` (the local provider sets it for `spec.protocol: GRPC`).
    #[arg(long)]
    pub grpc: bool,
}

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Base URL of the load balancer.
    #[arg(long, default_value = "http://127.0.0.1:8000", value_parser = parse_target)]
    pub target: String,
    /// Path to load (repeat for several; each gets the full load in turn).
    #[arg(long = "path", required_unless_present = "compare", value_parser = parse_path)]
    pub paths: Vec<String>,
    /// Requests per path (closed loop, unless --duration is given).
    #[arg(short = 'n', long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: u64,
    /// Connections (concurrent requests).
    #[arg(short = 'c', long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: u32,
    /// Open loop: requests per second per path (0.001 to 10 000 000).
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Run time per path, e.g. 30s.
    #[arg(long, value_parser = fleetlb_bench::parse_duration)]
    pub duration: Option<Duration>,
    /// After --rate for --duration, go on at another rate, RATE:DURATION (repeatable, in
    /// order), as one run: `--rate 10 --duration 20s --then 150:40s --then 10:90s` is a load
    /// that rises and falls, and the fleet-over-time chart shows the instances following it.
    #[arg(long, value_parser = fleetlb_bench::parse_step, requires_all = ["rate", "duration"])]
    pub then: Vec<(f64, Duration)>,
    /// Open a new connection for every request.
    #[arg(long)]
    pub no_keepalive: bool,
    /// Per-request timeout, e.g. 5s.
    #[arg(long, value_parser = fleetlb_bench::parse_duration, default_value = "10s")]
    pub timeout: Duration,
    /// Directory for per-path CSV files and summary.json.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Highest tolerated share of failed requests (transport errors, non-2xx/3xx), 0 to 1.
    #[arg(long, default_value_t = 0.0, value_parser = parse_error_rate)]
    pub max_error_rate: f64,
    /// Compare two summary.json files instead of running.
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    pub compare: Option<Vec<PathBuf>>,
}

#[derive(Args, Clone)]
pub struct ListenArgs {
    /// Proxy listen address (`:8000` is every interface, `localhost:8000` is 127.0.0.1).
    #[arg(long, default_value = "127.0.0.1:8000", value_parser = parse_listen_addr)]
    pub listen: SocketAddr,
    /// Admin listen address: /metrics /healthz /readyz /status /debug/endpoints.
    #[arg(long, default_value = "127.0.0.1:9090", value_parser = parse_listen_addr)]
    pub admin: SocketAddr,
    /// EC2 endpoint URL for the aws provider (e.g. a moto_server); AWS_ENDPOINT_URL works too.
    /// Region and credentials come from the standard AWS chain.
    #[arg(long, env = "FLEETLB_EC2_ENDPOINT")]
    pub ec2_endpoint: Option<String>,
    /// Identity of this install, tagged on every instance it launches
    /// (`fleetlb.dev/controller`); instances of other ids are never touched. Must be unique per
    /// AWS account and region. `run` derives it from the cluster (fleetlb-<UID of the
    /// kube-system namespace>) when not given; `standalone` requires it for the aws provider.
    #[arg(long, env = "FLEETLB_CONTROLLER_ID", value_parser = parse_controller_id)]
    pub controller_id: Option<String>,
    /// Proxy threads, each with its own single-threaded runtime, listener (SO_REUSEPORT) and
    /// upstream pool (default: one per core). 0 serves the proxy on the main runtime instead.
    #[arg(long, value_parser = clap::value_parser!(u16).range(0..=256))]
    pub proxy_threads: Option<u16>,
    /// HTTPS listen address (with --tls-cert and --tls-key): TLS 1.2 and 1.3, ALPN h2 and
    /// http/1.1, routed like the plain listener with X-Forwarded-Proto: https.
    #[arg(long, requires_all = ["tls_cert", "tls_key"], value_parser = parse_listen_addr)]
    pub tls_listen: Option<SocketAddr>,
    /// Certificate chain (PEM, leaf first) for --tls-listen. Repeat for several: the one whose
    /// names match the client's SNI is served, the first when none does. Read again when the
    /// file changes (a renewed Secret); a broken new file keeps the old certificate.
    #[arg(long, requires = "tls_listen")]
    pub tls_cert: Vec<std::path::PathBuf>,
    /// Private key (PEM) of the --tls-cert at the same position.
    #[arg(long, requires = "tls_listen")]
    pub tls_key: Vec<std::path::PathBuf>,
    /// The port clients reach the HTTPS listener on, used in redirects to HTTPS (default: the
    /// listener's own; behind a Service or NAT mapping 443 to it, 443).
    #[arg(long, requires = "tls_listen", value_parser = clap::value_parser!(u16).range(1..))]
    pub tls_public_port: Option<u16>,
    /// The availability zone this proxy runs in, e.g. us-east-1a, or `imds` to ask the EC2
    /// instance metadata service (IMDSv2; from a pod the node's hop limit must be 2 or more).
    /// Requests then prefer healthy instances in this zone while they are not overloaded or
    /// clearly slower (default: no zone preference).
    #[arg(long, env = "FLEETLB_ZONE", value_parser = parse_zone)]
    pub zone: Option<String>,
    /// SQS queue (name or URL) that EventBridge rules fill with EC2 spot interruption
    /// warnings, rebalance recommendations, instance state changes and AWS Health scheduled
    /// changes (docs/concepts/capacity.md). The leader reads it; an instance it names leaves
    /// the endpoint set at once and is replaced. Default: no queue.
    #[arg(long, env = "FLEETLB_INTERRUPTION_QUEUE", value_parser = parse_queue)]
    pub interruption_queue: Option<String>,
    /// SQS endpoint URL for --interruption-queue (e.g. a moto_server); AWS_ENDPOINT_URL_SQS
    /// works too. Region and credentials come from the standard AWS chain.
    #[arg(long, env = "FLEETLB_SQS_ENDPOINT")]
    pub sqs_endpoint: Option<String>,
    /// Proxies whose X-Forwarded-For/-Proto/-Host, Forwarded and X-Real-IP are believed and
    /// appended to, as CIDRs (repeatable or comma-separated, e.g. 10.0.0.0/8). From anyone
    /// else those headers are replaced by what fleetlb saw.
    #[arg(long, value_delimiter = ',', value_parser = parse_cidr)]
    pub trusted_proxies: Vec<fleetlb_dataplane::IpNet>,
    /// On SIGTERM or SIGINT, /readyz answers 503 at once but the proxy keeps accepting and
    /// serving this long (time for the endpoint's removal to reach every node and load
    /// balancer) before it stops accepting and drains. Default: 15s for `run`, 0 for `demo`
    /// and `standalone`. A second signal cuts the wait short.
    #[arg(long, value_parser = parse_delay)]
    pub shutdown_delay: Option<std::time::Duration>,
    /// Write one JSON line per request (client, TLS, method, host, path, status, bytes,
    /// times, cluster, endpoint and instance, tries, fleetlb's reason when it answered
    /// itself, request and trace id, user agent) to `stdout` or to FILE (appended to; rotate
    /// with copytruncate). Default: off, `stdout` for `demo`; `off` turns it off. Written by a
    /// thread of its own: a line that cannot keep up is dropped and counted
    /// (fleetlb_access_log_dropped_total), never waited for.
    #[arg(long, value_name = "stdout|FILE|off")]
    pub access_log: Option<String>,
    /// Share of requests the access log keeps (0 to 1), of those answered below 500 by a
    /// backend; 5xx answers and fleetlb's own (no route, no healthy endpoint, client gone,
    /// ...) are always kept.
    #[arg(long, default_value_t = 1.0, value_parser = parse_share)]
    pub access_log_sample: f64,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// A duration like `15s`, `500ms` or `0`.
fn parse_sync_period(s: &str) -> Result<std::time::Duration, String> {
    let d = fleetlb_bench::parse_duration(s)?;
    if d < std::time::Duration::from_secs(5) {
        return Err(format!("{s:?} is too short: at least 5s"));
    }
    Ok(d)
}

/// A share from 0 to 1, like `0.1`.
fn parse_share(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "must be a number from 0 to 1, e.g. 0.1 (got {s:?})"
        )),
    }
}

fn parse_delay(s: &str) -> Result<std::time::Duration, String> {
    match s.trim() {
        "0" | "0s" | "0ms" => Ok(std::time::Duration::ZERO),
        s => fleetlb_bench::parse_duration(s),
    }
}

/// Every timer and bound of `fleetlb_dataplane::Limits`, as flags made from its table (names,
/// help and defaults come from there; docs/limits.md is made from the same table).
#[derive(Clone, Default)]
pub struct LimitArgs(pub fleetlb_dataplane::Limits);

impl clap::FromArgMatches for LimitArgs {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut out = Self::default();
        out.update_from_arg_matches(m)?;
        Ok(out)
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        for row in fleetlb_dataplane::Limits::TABLE {
            if let Some(v) = m.get_one::<String>(row.flag) {
                // Checked by the value parser already.
                self.0
                    .set(row.flag, v)
                    .map_err(|e| clap::Error::raw(clap::error::ErrorKind::ValueValidation, e))?;
            }
        }
        Ok(())
    }
}

impl clap::Args for LimitArgs {
    fn augment_args(mut cmd: clap::Command) -> clap::Command {
        let defaults = fleetlb_dataplane::Limits::default();
        for row in fleetlb_dataplane::Limits::TABLE {
            let flag = row.flag;
            let check = move |v: &str| -> Result<String, String> {
                fleetlb_dataplane::Limits::default().set(flag, v)?;
                Ok(v.to_string())
            };
            cmd = cmd.arg(
                clap::Arg::new(flag)
                    .long(flag)
                    .value_name(if defaults.show(flag).is_some_and(|v| v.ends_with('s')) {
                        "DURATION"
                    } else {
                        "N"
                    })
                    .help(row.help)
                    .help_heading("Limits (docs/limits.md)")
                    .default_value(defaults.show(flag).unwrap_or_default())
                    .value_parser(check),
            );
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// An address to listen on: `IP:PORT`, `[IPv6]:PORT`, `:PORT` (every interface, as Go's and
/// nginx's `listen 8000` mean) or `localhost:PORT` (127.0.0.1).
fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    parse_addr(s, std::net::Ipv4Addr::UNSPECIFIED)
}

/// An address to connect to: as [`parse_listen_addr`], but `:PORT` is this machine.
fn parse_connect_addr(s: &str) -> Result<SocketAddr, String> {
    parse_addr(s, std::net::Ipv4Addr::LOCALHOST)
}

fn parse_addr(s: &str, no_host: std::net::Ipv4Addr) -> Result<SocketAddr, String> {
    let shape =
        || format!("must be IP:PORT, :PORT or localhost:PORT, e.g. 127.0.0.1:8000 (got {s:?})");
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(shape)?;
    let port: u16 = port.parse().map_err(|_| shape())?;
    let ip = match host {
        "" | "*" => no_host,
        h if h.eq_ignore_ascii_case("localhost") => std::net::Ipv4Addr::LOCALHOST,
        _ => return Err(shape()),
    };
    Ok(SocketAddr::from((ip, port)))
}

/// A CIDR (`10.0.0.0/8`) or a single address.
fn parse_zone(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a zone name like us-east-1a (or imds to ask the instance metadata service)"
        ))
    }
}

/// An SQS queue name (1 to 80 letters, digits, `-` and `_`) or a queue URL; not a FIFO
/// queue (a message held while its instance drains would hold up every later one).
fn parse_queue(s: &str) -> Result<String, String> {
    if s.ends_with(".fifo") {
        return Err(format!(
            "{s:?} is a FIFO queue: use a standard queue (one message held while its instance drains would hold up every later one)"
        ));
    }
    if s.starts_with("https://") || s.starts_with("http://") {
        return Ok(s.to_string());
    }
    let name = s;
    let ok = (1..=80).contains(&s.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not an SQS queue name (up to 80 letters, digits, - and _) or queue URL"
        ))
    }
}

fn parse_cidr(s: &str) -> Result<fleetlb_dataplane::IpNet, String> {
    s.parse::<fleetlb_dataplane::IpNet>()
        .or_else(|_| {
            s.parse::<std::net::IpAddr>()
                .map(fleetlb_dataplane::IpNet::from)
        })
        .map_err(|_| "must be a CIDR such as 10.0.0.0/8, or an address".into())
}

#[derive(Args, Clone)]
pub struct LeaseArgs {
    /// Namespace of the leader-election Lease: the controller's own.
    #[arg(long, env = "POD_NAMESPACE", default_value = "fleetlb-system")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "fleetlb-leader")]
    pub lease_name: String,
    /// This replica's identity in the Lease and in Events (default: the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Act without leader election. Only safe with a single replica.
    #[arg(long)]
    pub no_leader_election: bool,
}

/// `host:port` (a name, an IPv4 address or a bracketed IPv6 one) of a peer's admin port.
fn parse_peer(s: &str) -> Result<String, String> {
    let shape = "must be host:port, e.g. fleetlb-peers:9090";
    let (host, port) = s.rsplit_once(':').ok_or(shape)?;
    let host_ok = !host.is_empty()
        && (host.parse::<std::net::Ipv4Addr>().is_ok()
            || host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
            || host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(s.to_string()),
        _ => Err(shape.into()),
    }
}

pub fn parse_controller_id(s: &str) -> Result<String, String> {
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

/// An `http://` URL.
fn parse_target(s: &str) -> Result<String, String> {
    if s.starts_with("http://") && s.parse::<http::Uri>().is_ok() {
        Ok(s.to_string())
    } else {
        Err("must be an http:// URL".into())
    }
}

/// A request path.
fn parse_path(s: &str) -> Result<String, String> {
    if s.starts_with('/') && s.parse::<http::uri::PathAndQuery>().is_ok() {
        Ok(s.to_string())
    } else {
        Err("must be a path starting with /".into())
    }
}

/// Requests per second.
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.001..=10_000_000.0).contains(&r) => Ok(r),
        _ => Err("must be between 0.001 and 10000000 requests per second".into()),
    }
}

/// A share, 0 to 1.
fn parse_error_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err("must be between 0 and 1".into()),
    }
}

/// An existing directory, or `examples` (the demo's default, built in when missing).
fn parse_demo_dir(s: &str) -> Result<PathBuf, String> {
    if s == "examples" {
        Ok(PathBuf::from(s))
    } else {
        parse_dir(s)
    }
}

/// An existing directory.
fn parse_dir(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    if p.is_dir() {
        Ok(p)
    } else {
        Err("not a directory".into())
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_connect_addr, parse_listen_addr};

    #[test]
    fn addresses_take_the_shapes_people_type() {
        let at = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        assert_eq!(parse_listen_addr(":8000"), Ok(at("0.0.0.0:8000")));
        assert_eq!(parse_listen_addr("*:8000"), Ok(at("0.0.0.0:8000")));
        assert_eq!(
            parse_listen_addr("localhost:9090"),
            Ok(at("127.0.0.1:9090"))
        );
        assert_eq!(
            parse_listen_addr("LOCALHOST:9090"),
            Ok(at("127.0.0.1:9090"))
        );
        assert_eq!(parse_listen_addr("10.0.0.1:80"), Ok(at("10.0.0.1:80")));
        assert_eq!(parse_listen_addr("[::1]:80"), Ok(at("[::1]:80")));
        assert_eq!(parse_connect_addr(":9090"), Ok(at("127.0.0.1:9090")));
        for bad in [
            "8000",
            "localhost",
            "example.com:80",
            ":99999",
            ":",
            "1.2.3.4:x",
        ] {
            let err = parse_listen_addr(bad).unwrap_err();
            assert!(err.contains("IP:PORT") && err.contains(bad), "{bad}: {err}");
        }
    }
}
