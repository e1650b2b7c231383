//! PNG charts of a run (plotters): latency distribution per path, latency over time, and
//! requests per instance — the pictures that go into a report.
//!
//! Text needs a TrueType font; the first of `FLEETLB_FONT`, DejaVu Sans and Liberation Sans found
//! on the machine is used (Debian: `fonts-dejavu-core`). Without one, charts are skipped with a
//! message and the CSV and JSON output is unaffected.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::load::PathRun;
use crate::report::{INSTANCE_WINDOW, PathSummary, file_stem, timeline};

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

type ChartResult<T> = Result<T, String>;

/// Registers a font once per process; `Err` says why charts cannot be drawn.
fn font() -> ChartResult<()> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let mut candidates: Vec<PathBuf> = std::env::var_os("FLEETLB_FONT")
            .map(PathBuf::from)
            .into_iter()
            .collect();
        candidates.extend(FONT_CANDIDATES.iter().map(PathBuf::from));
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(
            "no TrueType font found for charts (install fonts-dejavu-core or set FLEETLB_FONT)"
                .into(),
        )
    })
    .clone()
}

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// The series' labels in a framed box at `position`.
fn legend<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
    font: u32,
) -> ChartResult<()>
where
    DB: DrawingBackend + 'a,
    CT: CoordTranslate,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", font))
        .draw()
        .map_err(err)
}

/// Draws every chart into `dir`; returns the files written.
pub fn draw(dir: &Path, runs: &[PathRun], summaries: &[PathSummary]) -> ChartResult<Vec<PathBuf>> {
    font()?;
    let mut written = Vec::new();
    let f = dir.join("latency-distribution.png");
    distribution(&f, runs)?;
    written.push(f);
    for run in runs {
        let f = dir.join(format!("latency-over-time-{}.png", file_stem(&run.path)));
        over_time(&f, run)?;
        written.push(f);
        let f = dir.join(format!("fleet-over-time-{}.png", file_stem(&run.path)));
        fleet_over_time(&f, run)?;
        written.push(f);
    }
    let f = dir.join("requests-per-instance.png");
    per_instance(&f, summaries)?;
    written.push(f);
    Ok(written)
}

/// Latency (log scale) against percentile, one line per path; x is `-log10(1 - q)` so 90 %,
/// 99 % and 99.9 % are evenly spaced.
fn distribution(file: &Path, runs: &[PathRun]) -> ChartResult<()> {
    let root = BitMapBackend::new(file, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let curves: Vec<(String, Vec<(f64, f64)>)> = runs
        .iter()
        .map(|r| {
            let mut lat: Vec<f64> = r
                .records
                .iter()
                .filter(|x| x.outcome.is_ok())
                .map(|x| (x.latency_us as f64 / 1000.0).max(0.001))
                .collect();
            lat.sort_by(f64::total_cmp);
            let n = lat.len();
            let pts = lat
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let q = (i as f64 + 0.5) / n as f64;
                    ((1.0 / (1.0 - q)).log10().min(4.0), *l)
                })
                .collect();
            (r.path.clone(), pts)
        })
        .collect();
    let max_y = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(1.0, f64::max);
    let min_y = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(f64::MAX, f64::min)
        .clamp(0.001, max_y)
        / 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption("Latency by percentile", ("sans-serif", 28))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..3.2f64, (min_y..max_y * 1.2).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(5)
        .x_label_formatter(&|x| match (x * 10.0).round() as i64 {
            0 => "0%".into(),
            10 => "90%".into(),
            20 => "99%".into(),
            30 => "99.9%".into(),
            _ => String::new(),
        })
        .label_style(("sans-serif", 16))
        .draw()
        .map_err(err)?;
    for (i, (path, pts)) in curves.into_iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(err)?
            .label(path)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft, 16)?;
    root.present().map_err(err)
}

/// Every request's latency at its send time (errors in red at the top).
fn over_time(file: &Path, run: &PathRun) -> ChartResult<()> {
    let root = BitMapBackend::new(file, (1000, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let step = (run.records.len() / 20_000).max(1);
    let pts: Vec<(f64, f64, bool)> = run
        .records
        .iter()
        .step_by(step)
        .map(|r| {
            (
                r.start_us as f64 / 1e6,
                r.latency_us as f64 / 1000.0,
                r.outcome.is_err(),
            )
        })
        .collect();
    let max_x = pts.iter().map(|p| p.0).fold(0.001, f64::max);
    let max_y = pts.iter().map(|p| p.1).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Latency over time: {}", run.path),
            ("sans-serif", 26),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..max_x * 1.02, 0f64..max_y * 1.1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("time since start (s)")
        .y_desc("latency (ms)")
        .label_style(("sans-serif", 16))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(pts.iter().map(|(x, y, failed)| {
            let c = if *failed { COLORS[3] } else { COLORS[0] };
            Circle::new((*x, *y), 2, c.filled())
        }))
        .map_err(err)?;
    root.present().map_err(err)
}

/// Second by second: the load and the instances answering it (top), p50 and p99 with failures
/// at the time they took (bottom). An autoscaled cluster shows its fleet following the load.
fn fleet_over_time(file: &Path, run: &PathRun) -> ChartResult<()> {
    let root = BitMapBackend::new(file, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let seconds = timeline(run);
    let (top, bottom) = root.split_vertically(370);
    let max_x = seconds.len().max(1) as f64;
    let max_rps = seconds.iter().map(|s| s.requests).max().unwrap_or(1).max(1) as f64;
    let max_n = seconds
        .iter()
        .map(|s| s.instances)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!("Load and instances answering: {}", run.path),
            ("sans-serif", 24),
        )
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0f64..max_x, 0f64..max_rps * 1.15)
        .map_err(err)?
        .set_secondary_coord(0f64..max_x, 0f64..max_n * 1.3 + 1.0);
    chart
        .configure_mesh()
        .y_desc("requests/s")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(err)?;
    chart
        .configure_secondary_axes()
        .y_desc("instances")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(err)?;
    let load = COLORS[1];
    chart
        .draw_series(LineSeries::new(
            seconds.iter().map(|s| (s.second as f64, s.requests as f64)),
            load.stroke_width(2),
        ))
        .map_err(err)?
        .label("requests/s")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], load.stroke_width(2)));
    let fleet = COLORS[2];
    chart
        .draw_secondary_series(LineSeries::new(
            seconds
                .iter()
                .map(|s| (s.second as f64, s.instances as f64)),
            fleet.stroke_width(3),
        ))
        .map_err(err)?
        .label(format!("instances answering (last {INSTANCE_WINDOW} s)"))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], fleet.stroke_width(3)));
    legend(&mut chart, SeriesLabelPosition::UpperRight, 15)?;

    // Log scale: a burst's seconds of queueing and the steady milliseconds both readable.
    let max_ms = seconds.iter().map(|s| s.p99_ms).fold(1.0, f64::max);
    let min_ms = seconds
        .iter()
        .filter(|s| s.requests > 0)
        .map(|s| s.p50_ms)
        .fold(f64::MAX, f64::min)
        .clamp(0.01, max_ms)
        / 2.0;
    let mut chart = ChartBuilder::on(&bottom)
        .margin(15)
        .margin_right(75)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..max_x, (min_ms..max_ms * 1.5).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("time since start (s)")
        .y_desc("latency (ms)")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(err)?;
    for (i, (name, q)) in [("p99", 1usize), ("p50", 0)].into_iter().enumerate() {
        let color = COLORS[if i == 0 { 3 } else { 0 }];
        let pts: Vec<(f64, f64)> = seconds
            .iter()
            .filter(|s| s.requests > 0)
            .map(|s| (s.second as f64, if q == 1 { s.p99_ms } else { s.p50_ms }))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight, 15)?;
    root.present().map_err(err)
}

/// Requests per instance, grouped by path: did balancing spread the load?
fn per_instance(file: &Path, summaries: &[PathSummary]) -> ChartResult<()> {
    let root = BitMapBackend::new(file, (1000, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let bars: Vec<(String, u64, usize)> = summaries
        .iter()
        .enumerate()
        .flat_map(|(pi, s)| {
            s.instances
                .iter()
                .map(move |i| (format!("{} {}", s.path, short(&i.id)), i.count, pi))
        })
        .collect();
    if bars.is_empty() {
        return root.present().map_err(err);
    }
    let max_y = bars.iter().map(|b| b.1).max().unwrap_or(1);
    let n = bars.len() as u32;
    let mut chart = ChartBuilder::on(&root)
        .caption("Requests per instance", ("sans-serif", 26))
        .margin(15)
        .x_label_area_size(60)
        .y_label_area_size(70)
        .build_cartesian_2d((0u32..n - 1).into_segmented(), 0u64..max_y + max_y / 8 + 1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => bars
                .get(*i as usize)
                .map(|b| b.0.clone())
                .unwrap_or_default(),
            _ => String::new(),
        })
        .y_desc("requests")
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(
            Histogram::vertical(&chart)
                .style_func(|v, _| match v {
                    SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => bars
                        .get(*i as usize)
                        .map(|b| COLORS[b.2 % COLORS.len()].filled())
                        .unwrap_or(BLACK.filled()),
                    SegmentValue::Last => BLACK.filled(),
                })
                .margin(8)
                .data(bars.iter().enumerate().map(|(i, b)| (i as u32, b.1))),
        )
        .map_err(err)?;
    root.present().map_err(err)
}

/// The last 6 characters of an instance id, enough to tell instances apart on an axis.
fn short(id: &str) -> &str {
    let start = id.char_indices().rev().nth(5).map(|(i, _)| i).unwrap_or(0);
    &id[start..]
}
