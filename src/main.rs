#![forbid(unsafe_code)]
//! `fleetlb`: the binary. Parse the command line ([`cli`]), run the command ([`app`] for the
//! serving modes, [`commands`] for the tools), map the outcome to an exit code. All logic lives
//! in the workspace crates.

mod app;
mod backend;
mod cli;
mod commands;
mod status;

use std::process::ExitCode;

/// The static (musl) build allocates with mimalloc: musl's own allocator serialises threads.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

use app::AppError;
use cli::{Cli, Command, LogFormat};

/// Exit code for bad flags and bad configuration (BSD `EX_USAGE`).
const EX_USAGE: u8 = 64;
/// Exit code when a service fleetlb needs (the API server) does not answer (`EX_UNAVAILABLE`).
const EX_UNAVAILABLE: u8 = 69;

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
        Err(AppError::Usage(e)) => {
            eprintln!("fleetlb: {e}");
            ExitCode::from(EX_USAGE)
        }
        Err(AppError::Unavailable(e)) => {
            eprintln!("fleetlb: {e}");
            ExitCode::from(EX_UNAVAILABLE)
        }
        Err(AppError::Failed(e)) => {
            eprintln!("fleetlb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<ExitCode, AppError> {
    let done = |r: Result<(), AppError>| r.map(|()| ExitCode::SUCCESS);
    match command {
        Command::Validate { paths } => Ok(commands::validate(&paths)),
        Command::Crd => {
            print!("{}", fleetlb_crds::crd_yaml());
            Ok(ExitCode::SUCCESS)
        }
        Command::IamPolicy {
            controller_id,
            partition,
            instance_role,
            interruption_queue,
        } => {
            let opts = fleetlb_controller::iam::PolicyOptions {
                controller_id,
                partition,
                instance_role,
                interruption_queue,
            };
            print!("{}", fleetlb_controller::iam::policy_json(&opts));
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { admin, json } => Ok(status::print(admin, json).await?),
        Command::Bench(args) => Ok(commands::bench(args).await?),
        Command::Backend(args) => Ok(commands::backend(args).await?),
        Command::Demo { config, mut listen } => {
            // The demo shows each request as it goes.
            listen.access_log.get_or_insert_with(|| "stdout".into());
            let dir = if config.is_dir() {
                config
            } else {
                app::write_builtin_examples()?
            };
            done(app::run_standalone(dir, listen, true, shutdown_signal()).await)
        }
        Command::Standalone { config, listen } => {
            done(app::run_standalone(config, listen, false, shutdown_signal()).await)
        }
        Command::Run {
            mut listen,
            lease,
            peers,
            sync_period,
        } => {
            // In a cluster, endpoint removal takes a while to reach every node.
            listen
                .shutdown_delay
                .get_or_insert(std::time::Duration::from_secs(15));
            done(app::run_kubernetes(listen, lease, peers, sync_period, shutdown_signal()).await)
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
            eprintln!("fleetlb: {} (see fleetlb --help)", one_line(&e.to_string()));
            ExitCode::from(EX_USAGE)
        }
    }
}

/// clap's message on one line, all of it that says what is wrong: the argument it names, the
/// possible values, a suggestion; not the usage that follows it.
fn one_line(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        let line = line.strip_prefix("error: ").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push_str(if out.ends_with(':') { " " } else { "; " });
        }
        out.push_str(line);
    }
    if out.is_empty() {
        out.push_str("invalid arguments");
    }
    out
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

/// Completes on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
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
