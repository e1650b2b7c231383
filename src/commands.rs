//! The tool subcommands: `bench` (load test) and `backend` (one demo instance).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;

use crate::backend::{self, BackendConfig, Profile};
use crate::cli::{BackendArgs, BenchArgs};

/// `fleetlb bench`.
pub async fn bench(a: BenchArgs) -> anyhow::Result<ExitCode> {
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
        then: a.then,
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

/// `fleetlb backend`: serves until a signal (or, with `exit_on_stdin_eof`, until standard input
/// closes). Prints `ready ADDR` once it listens: the local provider reads the port from it.
pub async fn backend(a: BackendArgs) -> anyhow::Result<ExitCode> {
    let mut p = Profile::for_instance_type(&a.profile);
    if let Some(ms) = a.latency_ms {
        p.latency = Duration::from_millis(ms);
    }
    if let Some(c) = a.concurrency {
        p.concurrency = c as usize;
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], a.port));
    let listener = fleetlb_dataplane::listen(addr, fleetlb_dataplane::Reuse::Address)
        .with_context(|| format!("cannot listen on {addr} (backend)"))?;
    let addr = listener.local_addr()?;
    // The local provider waits for this line before calling the instance running.
    println!("ready {addr}");
    let cfg = BackendConfig {
        id: a.id,
        cluster: a.cluster,
        instance_type: a.profile,
        profile: p,
    };
    let stop = async move {
        if a.exit_on_stdin_eof {
            tokio::select! {
                () = stdin_closed() => {}
                () = crate::shutdown_signal() => {}
            }
        } else {
            crate::shutdown_signal().await
        }
    };
    backend::serve(listener, cfg, stop).await;
    Ok(ExitCode::SUCCESS)
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
