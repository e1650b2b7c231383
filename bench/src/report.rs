//! Summaries of a run: per path and per instance, as a table, CSV and JSON, and the side-by-side
//! comparison of two runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::load::PathRun;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// One instance's part of a path's traffic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceSummary {
    /// Instance id from the response body.
    pub id: String,
    /// Responses it sent.
    pub count: u64,
    /// Its share of the path's responses.
    pub share: f64,
    /// Its latency.
    pub latency_ms: Latency,
}

/// One path's results.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PathSummary {
    /// The path.
    pub path: String,
    /// Requests sent.
    pub count: u64,
    /// Responses with a 2xx status.
    pub ok: u64,
    /// Requests that failed: transport errors plus non-2xx/3xx statuses.
    pub failed: u64,
    /// Transport errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Responses by status class (`2xx`, ...).
    pub status: BTreeMap<String, u64>,
    /// First send to last completion, seconds.
    pub wall_s: f64,
    /// Requests per second over the wall time.
    pub throughput_rps: f64,
    /// Latency of every request that got a response.
    pub latency_ms: Latency,
    /// Per instance, most requests first.
    pub instances: Vec<InstanceSummary>,
    /// Open loop: how late requests left after their scheduled time (waiting for a free
    /// connection, or a generator that cannot keep up); included in `latency_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_lag_ms: Option<Latency>,
}

/// The whole run, as written to `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// Target base URL.
    pub target: String,
    /// `closed` or `open`.
    pub mode: String,
    /// Connections.
    pub concurrency: usize,
    /// Requests per second asked for (open loop).
    pub rate: Option<f64>,
    /// Per path.
    pub paths: Vec<PathSummary>,
}

impl Summary {
    /// Failed requests over all requests.
    pub fn error_rate(&self) -> f64 {
        let (f, n) = self
            .paths
            .iter()
            .fold((0, 0), |(f, n), p| (f + p.failed, n + p.count));
        if n == 0 { 0.0 } else { f as f64 / n as f64 }
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 1 h at 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Summarises one path's records.
pub fn summarize(run: &PathRun) -> PathSummary {
    let mut all = histogram();
    let mut lag = histogram();
    let mut per: BTreeMap<&str, Histogram<u64>> = BTreeMap::new();
    let mut errors = BTreeMap::new();
    let mut status = BTreeMap::new();
    let (mut ok, mut failed) = (0, 0);
    for r in &run.records {
        let _ = lag.record(r.lag_us.max(1));
        match r.outcome {
            Ok(code) => {
                let _ = all.record(r.latency_us.max(1));
                *status.entry(format!("{}xx", code / 100)).or_insert(0u64) += 1;
                if (200..300).contains(&code) {
                    ok += 1;
                }
                if !(200..400).contains(&code) {
                    failed += 1;
                }
                if let Some(id) = &r.instance {
                    let _ = per
                        .entry(id)
                        .or_insert_with(histogram)
                        .record(r.latency_us.max(1));
                }
            }
            Err(kind) => {
                failed += 1;
                *errors.entry(kind.as_str().to_string()).or_insert(0u64) += 1;
            }
        }
    }
    let count = run.records.len() as u64;
    let answered: u64 = per.values().map(|h| h.len()).sum();
    let mut instances: Vec<InstanceSummary> = per
        .iter()
        .map(|(id, h)| InstanceSummary {
            id: id.to_string(),
            count: h.len(),
            share: if answered == 0 {
                0.0
            } else {
                h.len() as f64 / answered as f64
            },
            latency_ms: Latency::of(h),
        })
        .collect();
    instances.sort_by(|a, b| b.count.cmp(&a.count).then(a.id.cmp(&b.id)));
    let wall_s = run.wall.as_secs_f64();
    PathSummary {
        path: run.path.clone(),
        count,
        ok,
        failed,
        errors,
        status,
        wall_s,
        throughput_rps: if wall_s > 0.0 {
            count as f64 / wall_s
        } else {
            0.0
        },
        latency_ms: Latency::of(&all),
        instances,
        send_lag_ms: run.open_loop.then(|| Latency::of(&lag)),
    }
}

/// The summary table printed on stdout.
pub fn table(s: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:>7} {:>7} {:>8} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}",
        "PATH",
        "REQS",
        "OK",
        "ERRORS",
        "WALL s",
        "REQ/s",
        "MEAN ms",
        "P50 ms",
        "P90 ms",
        "P99 ms",
        "P99.9 ms",
        "MAX ms"
    );
    for p in &s.paths {
        let l = &p.latency_ms;
        let _ = writeln!(
            out,
            "{:<14} {:>7} {:>7} {:>8} {:>9.3} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>8.2}",
            p.path,
            p.count,
            p.ok,
            p.failed,
            p.wall_s,
            p.throughput_rps,
            l.mean,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max
        );
    }
    for p in &s.paths {
        if let Some(lag) = &p.send_lag_ms {
            let _ = writeln!(
                out,
                "{}: requests left {:.2} ms (p50) / {:.2} ms (p99) / {:.2} ms (max) after their scheduled time, \
                 counted in the latency; a large lag means too few connections (-c) for the rate",
                p.path, lag.p50, lag.p99, lag.max
            );
        }
    }
    for p in &s.paths {
        if !p.errors.is_empty() || p.status.keys().any(|k| k != "2xx") {
            let errs: Vec<String> = p.errors.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let st: Vec<String> = p.status.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(
                out,
                "{}: status {}  errors {}",
                p.path,
                st.join(" "),
                errs.join(" ")
            );
        }
    }
    for p in &s.paths {
        if p.instances.is_empty() {
            continue;
        }
        let _ = writeln!(out, "\n{} by instance:", p.path);
        let _ = writeln!(
            out,
            "  {:<22} {:>7} {:>7} {:>8} {:>8}",
            "INSTANCE", "REQS", "SHARE", "MEAN ms", "P99 ms"
        );
        for i in &p.instances {
            let _ = writeln!(
                out,
                "  {:<22} {:>7} {:>6.1}% {:>8.2} {:>8.2}",
                i.id,
                i.count,
                i.share * 100.0,
                i.latency_ms.mean,
                i.latency_ms.p99
            );
        }
    }
    out
}

/// Writes one CSV per path (`<path>.csv`: one row per request) and `summary.json` into `dir`.
pub fn write(dir: &Path, runs: &[PathRun], summary: &Summary) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for run in runs {
        let mut csv = String::from("seq,start_ms,latency_ms,status,error,instance\n");
        for r in &run.records {
            let (status, error) = match r.outcome {
                Ok(s) => (s.to_string(), String::new()),
                Err(k) => (String::new(), k.as_str().to_string()),
            };
            let _ = writeln!(
                csv,
                "{},{:.3},{:.3},{},{},{}",
                r.seq,
                r.start_us as f64 / 1000.0,
                r.latency_us as f64 / 1000.0,
                status,
                error,
                r.instance.as_deref().unwrap_or("")
            );
        }
        std::fs::write(dir.join(format!("{}.csv", file_stem(&run.path))), csv)?;
        let mut csv = String::from("second,requests,errors,instances,p50_ms,p99_ms\n");
        for s in timeline(run) {
            let _ = writeln!(
                csv,
                "{},{},{},{},{:.3},{:.3}",
                s.second, s.requests, s.errors, s.instances, s.p50_ms, s.p99_ms
            );
        }
        std::fs::write(
            dir.join(format!("timeline-{}.csv", file_stem(&run.path))),
            csv,
        )?;
    }
    let json = serde_json::to_vec_pretty(summary).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("summary.json"), json)
}

/// One second of a run, by scheduled send time.
#[derive(Debug, Clone, PartialEq)]
pub struct Second {
    /// Seconds since the start.
    pub second: u64,
    /// Requests sent in it.
    pub requests: u64,
    /// Of which failed (transport errors, statuses other than 2xx/3xx, as in the summary).
    pub errors: u64,
    /// Distinct instances that answered requests sent in the [`INSTANCE_WINDOW`] up to this
    /// second: the fleet serving at that time (a window, so a low rate spread over many
    /// instances does not read as fewer instances).
    pub instances: usize,
    /// Median latency, ms, failures included at the time they took (0 with no request).
    pub p50_ms: f64,
    /// 99th percentile, ms, failures included (a timeout counts as its timeout).
    pub p99_ms: f64,
}

/// Seconds over which [`Second::instances`] counts the instances that answered.
pub const INSTANCE_WINDOW: usize = 5;

/// The run second by second: load, failures, instances answering, p50 and p99 (the fleet
/// following the load, `timeline-<path>.csv` and its chart).
pub fn timeline(run: &PathRun) -> Vec<Second> {
    let Some(last) = run.records.iter().map(|r| r.start_us / 1_000_000).max() else {
        return Vec::new();
    };
    let n = last as usize + 1;
    let mut latencies: Vec<Vec<u64>> = vec![Vec::new(); n];
    let mut errors = vec![0u64; n];
    let mut answered_by: Vec<std::collections::HashSet<&str>> = vec![Default::default(); n];
    for r in &run.records {
        let i = (r.start_us / 1_000_000) as usize;
        latencies[i].push(r.latency_us);
        match r.outcome {
            Ok(status) if status < 400 => {
                if let Some(id) = r.instance.as_deref() {
                    answered_by[i].insert(id);
                }
            }
            _ => errors[i] += 1,
        }
    }
    let quantile = |sorted: &[u64], q: f64| {
        if sorted.is_empty() {
            0.0
        } else {
            let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
            sorted[i] as f64 / 1000.0
        }
    };
    (0..n)
        .map(|i| {
            let lat = &mut latencies[i];
            lat.sort_unstable();
            let window = &answered_by[(i + 1).saturating_sub(INSTANCE_WINDOW)..=i];
            let instances: std::collections::HashSet<&str> =
                window.iter().flatten().copied().collect();
            Second {
                second: i as u64,
                requests: lat.len() as u64,
                errors: errors[i],
                instances: instances.len(),
                p50_ms: quantile(lat, 0.5),
                p99_ms: quantile(lat, 0.99),
            }
        })
        .collect()
}

/// `/cluster1` -> `cluster1`, `/` -> `root`, other characters -> `_`.
pub fn file_stem(path: &str) -> String {
    let s: String = path
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() { "root".into() } else { s }
}

/// Two runs side by side, with B/A ratios.
pub fn compare(a: &Summary, b: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:<10} {:>12} {:>12} {:>8}",
        "PATH", "METRIC", "A", "B", "B/A"
    );
    for pa in &a.paths {
        let Some(pb) = b.paths.iter().find(|p| p.path == pa.path) else {
            continue;
        };
        let rows = [
            ("req/s", pa.throughput_rps, pb.throughput_rps),
            ("mean ms", pa.latency_ms.mean, pb.latency_ms.mean),
            ("p50 ms", pa.latency_ms.p50, pb.latency_ms.p50),
            ("p99 ms", pa.latency_ms.p99, pb.latency_ms.p99),
            ("p99.9 ms", pa.latency_ms.p999, pb.latency_ms.p999),
            ("errors", pa.failed as f64, pb.failed as f64),
        ];
        for (name, x, y) in rows {
            let ratio = if x > 0.0 {
                format!("{:.2}", y / x)
            } else {
                "-".into()
            };
            let _ = writeln!(
                out,
                "{:<14} {:<10} {:>12.2} {:>12.2} {:>8}",
                pa.path, name, x, y, ratio
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::load::{ErrorKind, Record};

    #[test]
    fn percentiles_and_shares() {
        let a: Arc<str> = Arc::from("i-a");
        let b: Arc<str> = Arc::from("i-b");
        let mut records: Vec<Record> = (0..100)
            .map(|i| Record {
                seq: i,
                start_us: i * 1000,
                latency_us: (i + 1) * 1000,
                lag_us: 0,
                outcome: Ok(200),
                instance: Some(if i % 4 == 0 { b.clone() } else { a.clone() }),
            })
            .collect();
        records.push(Record {
            seq: 100,
            start_us: 0,
            latency_us: 5,
            lag_us: 0,
            outcome: Err(ErrorKind::Connect),
            instance: None,
        });
        let s = summarize(&PathRun {
            path: "/c".into(),
            records,
            wall: Duration::from_secs(1),
            open_loop: false,
        });
        assert_eq!((s.count, s.ok, s.failed), (101, 100, 1));
        assert_eq!(
            s.send_lag_ms, None,
            "closed loop has no schedule to lag behind"
        );
        assert_eq!(s.errors["connect"], 1);
        assert!((s.latency_ms.p50 - 50.0).abs() < 0.1, "{:?}", s.latency_ms);
        assert!((s.latency_ms.p99 - 99.0).abs() < 0.1, "{:?}", s.latency_ms);
        assert_eq!(s.instances[0].id, "i-a");
        assert!((s.instances[0].share - 0.75).abs() < 1e-9);
    }

    #[test]
    fn file_stems() {
        assert_eq!(file_stem("/cluster1"), "cluster1");
        assert_eq!(file_stem("/"), "root");
        assert_eq!(file_stem("/a/b?x"), "a_b_x");
    }
}
