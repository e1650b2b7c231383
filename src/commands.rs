//! The tool subcommands: `bench` (load test), `backend` (one demo instance) and `validate`
//! (BackendCluster files checked without serving them).

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
        grpc: a.grpc,
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

/// `fleetlb validate`: every problem of every object in `paths` on stdout, one per line
/// (`file: BackendCluster ns/name (document N): field: what is wrong`), then a summary.
pub fn validate(paths: &[PathBuf]) -> ExitCode {
    use fleetlb_controller::files::{FileText, parse_file, read_dir};
    use std::sync::Arc;

    let mut problems: Vec<String> = Vec::new();
    // A directory is read as standalone reads it (its .yaml/.yml files by name, no dotfiles).
    let mut files: Vec<(PathBuf, FileText)> = Vec::new();
    for path in paths {
        if !path.is_dir() {
            let text = match std::fs::read_to_string(path) {
                Ok(t) => FileText::Text(t),
                Err(e) => FileText::Unreadable(e.to_string()),
            };
            files.push((path.clone(), text));
            continue;
        }
        match read_dir(path) {
            Ok((_, found)) if found.is_empty() => {
                problems.push(format!("{}: no .yaml or .yml files", path.display()));
            }
            Ok((_, found)) => files.extend(found),
            Err(e) => problems.push(format!("{}: {e}", path.display())),
        }
    }
    // Every valid object, with where it was defined, in the order read.
    let mut valid: Vec<(Arc<fleetlb_crds::BackendCluster>, String)> = Vec::new();
    for (file, text) in &files {
        let load = parse_file(file, text);
        match load.outcome {
            Err(why) => problems.push(why),
            Ok(docs) => {
                if docs.is_empty() {
                    problems.push(format!("{}: no BackendCluster in it", file.display()));
                }
                for doc in docs {
                    match doc.result {
                        // The validator joins one object's problems with "; ".
                        Err(line) => problems.extend(split_problems(&line)),
                        Ok(bc) => valid.push((
                            Arc::new(bc),
                            format!("{} (document {})", file.display(), doc.index),
                        )),
                    }
                }
            }
        }
    }
    // What standalone would refuse across files: one name twice, one route twice.
    let mut seen: std::collections::HashMap<fleetlb_controller::provider::ClusterKey, &str> =
        std::collections::HashMap::new();
    let objects: Vec<Arc<fleetlb_crds::BackendCluster>> =
        valid.iter().map(|(bc, _)| bc.clone()).collect();
    let mut invalid = 0;
    for (bc, at) in &valid {
        let key = fleetlb_controller::provider::ClusterKey::of(bc);
        let who = format!("BackendCluster {}/{}", key.namespace, key.name);
        if let Some(first) = seen.get(&key) {
            problems.push(format!(
                "{at}: {who}: metadata.name: also defined in {first}"
            ));
            invalid += 1;
            continue;
        }
        seen.insert(key, at);
        if let Some((holder, rule)) = fleetlb_controller::core::routes::route_holder(bc, &objects) {
            problems.push(format!(
                "{at}: {who}: spec.route: {rule} is already served by {holder}"
            ));
            invalid += 1;
        }
    }
    for p in &problems {
        println!("{p}");
    }
    let ok = valid.len() - invalid;
    println!(
        "{ok} valid BackendCluster{}, {} problem{} in {} file{}",
        if ok == 1 { "" } else { "s" },
        problems.len(),
        if problems.len() == 1 { "" } else { "s" },
        files.len(),
        if files.len() == 1 { "" } else { "s" },
    );
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `prefix: problem; problem` (one object's line) as one line per problem, each with the prefix
/// (`file: BackendCluster ns/name (document N): `).
fn split_problems(line: &str) -> Vec<String> {
    let Some(at) = line.find("): ") else {
        return vec![line.to_string()];
    };
    let (prefix, rest) = line.split_at(at + 3);
    rest.split("; ").map(|p| format!("{prefix}{p}")).collect()
}
