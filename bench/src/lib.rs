#![forbid(unsafe_code)]
//! `fleetlb bench`: the original experiment's load test (1000 requests per cluster, results per
//! cluster), done right: closed or open loop, HdrHistogram percentiles, errors by kind, which
//! instance answered each request, CSV and JSON output, comparison of two runs, and an exit
//! code that can gate CI.

pub mod chart;
pub mod load;
pub mod report;
mod worker;

use std::path::PathBuf;
use std::time::Duration;

pub use report::{Summary, compare};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Base URL, e.g. `http://127.0.0.1:8000`.
    pub target: String,
    /// Paths run one after the other, each with the full load.
    pub paths: Vec<String>,
    /// Requests per path (closed loop; open loop without `duration`).
    pub requests: Option<u64>,
    /// Connections (and workers).
    pub concurrency: usize,
    /// Open loop: requests per second per path (0.001 to 10 000 000; clamped to that range).
    pub rate: Option<f64>,
    /// Run time per path (closed loop: instead of `requests`).
    pub duration: Option<Duration>,
    /// Open loop: further steps after `rate` for `duration`, each (requests per second, run
    /// time), run back to back on the same path and reported as one run (a load that changes).
    pub then: Vec<(f64, Duration)>,
    /// Reuse connections (default) or open one per request.
    pub keepalive: bool,
    /// Per-request timeout, connection included.
    pub timeout: Duration,
    /// Where to write CSV and `summary.json`.
    pub out: Option<PathBuf>,
    /// Show a progress bar (on a terminal) instead of plain lines.
    pub progress: bool,
}

impl BenchConfig {
    /// Requests per path, if bounded by count.
    pub fn total_requests(&self) -> Option<u64> {
        match (self.rate, self.duration) {
            (Some(r), Some(d)) => Some((r * d.as_secs_f64()).ceil() as u64),
            (_, Some(_)) => None,
            _ => self.requests,
        }
    }
}

/// Runs every path and returns the summary (also writing files when `out` is set).
pub async fn run(cfg: &BenchConfig) -> std::io::Result<Summary> {
    let mut runs = Vec::new();
    for path in &cfg.paths {
        let bar = cfg.progress.then(|| {
            let bar = match cfg.total_requests() {
                Some(n) => indicatif::ProgressBar::new(n),
                None => indicatif::ProgressBar::new_spinner(),
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:<14} [{bar:40}] {pos}/{len} {per_sec}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(path.clone());
            bar
        });
        if bar.is_none() {
            eprintln!("fleetlb bench: {path}: running");
        }
        let run = run_steps(cfg, path, bar.as_ref()).await;
        if let Some(b) = bar {
            b.finish();
        } else {
            eprintln!("fleetlb bench: {path}: {} requests done", run.records.len());
        }
        runs.push(run);
    }
    let summary = Summary {
        target: cfg.target.clone(),
        mode: if cfg.rate.is_some() { "open" } else { "closed" }.into(),
        concurrency: cfg.concurrency,
        rate: cfg.rate,
        paths: runs.iter().map(report::summarize).collect(),
    };
    if let Some(dir) = &cfg.out {
        report::write(dir, &runs, &summary)?;
        if let Err(e) = chart::draw(dir, &runs, &summary.paths) {
            eprintln!("fleetlb bench: charts skipped: {e}");
        }
    }
    Ok(summary)
}

/// One path under `rate` for `duration`, then each of `then` in turn, as one run. Each step
/// starts when the one before is due to end, whether or not its last answers are in (an open
/// loop keeps offering load); records keep their place in time and in sequence.
async fn run_steps(
    cfg: &BenchConfig,
    path: &str,
    bar: Option<&indicatif::ProgressBar>,
) -> load::PathRun {
    let start = tokio::time::Instant::now();
    // Later steps wait for their time on tasks of their own; the first runs here, with the
    // progress bar (the steps overlap at the boundaries).
    let mut later = Vec::new();
    let mut nominal = cfg.duration.unwrap_or_default();
    for &(rate, duration) in &cfg.then {
        let step = BenchConfig {
            rate: Some(rate),
            duration: Some(duration),
            then: Vec::new(),
            ..cfg.clone()
        };
        let (at, path) = (start + nominal, path.to_string());
        later.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let offset = start.elapsed();
            (offset, load::run_path(&step, &path, None).await)
        }));
        nominal += duration;
    }
    let mut run = load::run_path(cfg, path, bar).await;
    for step in later {
        let Ok((offset, next)) = step.await else {
            eprintln!("fleetlb bench: {path}: a step failed to run");
            continue;
        };
        let (offset_us, seqs) = (offset.as_micros() as u64, run.records.len() as u64);
        run.records.extend(next.records.into_iter().map(|mut r| {
            r.start_us += offset_us;
            r.seq += seqs;
            r
        }));
        run.wall = run.wall.max(offset + next.wall);
    }
    run
}

/// Parses `RATE:DURATION` (`150:40s`), a step of `--then`.
pub fn parse_step(s: &str) -> Result<(f64, Duration), String> {
    let (rate, duration) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} must be RATE:DURATION, e.g. 150:40s"))?;
    let rate: f64 = rate
        .parse()
        .ok()
        .filter(|r: &f64| (0.001..=10_000_000.0).contains(r))
        .ok_or_else(|| format!("{s:?}: the rate must be between 0.001 and 10000000"))?;
    Ok((rate, parse_duration(duration)?))
}

/// Parses `500ms`, `30s`, `2m`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 30s or 2m"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("{s:?} must be positive"));
    }
    Duration::try_from_secs_f64(v * mult).map_err(|_| format!("{s:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1e300s").is_err());
    }
}
