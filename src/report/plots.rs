//! The report's SVG plots (plotters, SVG backend): perplexity and accuracy
//! against sparsity, one line per method with the dense model as a
//! horizontal reference, and the kept FFN width of every layer per method
//! at each sparsity. Each method keeps one colour in every plot (its place
//! in `Method::ALL`), its trace-calibrated rows a lighter shade of it; the
//! dense reference is dark grey.
use super::data::{MethodInfo, PlotInfo, Report, SeriesInfo};
use crate::io::output::replace_owned;
use crate::prune::Method;
use crate::{Error, Result};
use plotters::coord::ranged1d::{Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use std::path::Path;

/// Tableau 10, first six: one per method.
const PALETTE: [(u8, u8, u8); 6] = [
    (0x1f, 0x77, 0xb4),
    (0xff, 0x7f, 0x0e),
    (0x2c, 0xa0, 0x2c),
    (0xd6, 0x27, 0x28),
    (0x94, 0x67, 0xbd),
    (0x8c, 0x56, 0x4b),
];
const REFERENCE: (u8, u8, u8) = (0x44, 0x44, 0x44);

/// A row's colour: its method's, mixed halfway with white for traces.
fn method_color(m: &MethodInfo) -> (u8, u8, u8) {
    let i = Method::ALL
        .iter()
        .position(|x| x.name() == m.base)
        .unwrap_or(0);
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    let light = |c: u8| ((c as u16 + 255) / 2) as u8;
    match m.calibration.as_str() {
        "text" => (r, g, b),
        _ => (light(r), light(g), light(b)),
    }
}

struct Series {
    label: String,
    color: (u8, u8, u8),
    points: Vec<(f64, f64)>,
}

/// How the y axis spans the data.
#[derive(Clone, Copy, PartialEq)]
enum YAxis {
    /// Logarithmic around the data when it spans a decade, else linear
    /// around it (perplexities).
    Log,
    /// [0, 1], so accuracy charts compare at a glance.
    Unit,
    /// From 0 to a little above the largest value.
    FromZero,
}

/// A line chart; `x_pct` labels x as percentages.
struct Chart {
    file: String,
    title: String,
    x_desc: &'static str,
    y_desc: String,
    x_pct: bool,
    /// Most tick labels on the x axis.
    x_labels: usize,
    y_axis: YAxis,
    /// Series with no points are left out.
    series: Vec<Series>,
}

/// Writes every plot the report's data allows into `out/plots/`.
pub fn write_plots(r: &Report, out: &Path) -> Result<Vec<PlotInfo>> {
    let dir = out.join("plots");
    crate::io::output::inner_dir(&dir)?;
    let mut charts = Vec::new();
    if r.has("ppl") {
        charts.push(vs_sparsity(
            r,
            "ppl.svg",
            "Perplexity vs sparsity".into(),
            "perplexity".into(),
            YAxis::Log,
            |e| e.ppl.as_ref().map(|p| p.ppl),
        ));
    }
    if r.has("trace_ppl") {
        charts.push(vs_sparsity(
            r,
            "trace-ppl.svg",
            "Trace perplexity vs sparsity".into(),
            "trace perplexity".into(),
            YAxis::Log,
            |e| e.trace_ppl.as_ref().map(|p| p.ppl),
        ));
    }
    if r.has("gen") {
        let task = r
            .dense
            .gen
            .as_ref()
            .map_or("gen".into(), |g| g.task.clone());
        charts.push(vs_sparsity(
            r,
            "gen.svg",
            format!("{task} accuracy vs sparsity"),
            "accuracy (exact match)".into(),
            YAxis::Unit,
            |e| e.gen.as_ref().map(|g| g.accuracy),
        ));
    }
    if r.has("mc") {
        let task = r.dense.mc.as_ref().map_or("mc".into(), |m| m.task.clone());
        charts.push(vs_sparsity(
            r,
            "mc.svg",
            format!("{task} accuracy vs sparsity"),
            "acc (multiple choice)".into(),
            YAxis::Unit,
            |e| e.mc.as_ref().map(|m| m.acc),
        ));
    }
    for &s in &r.sparsities {
        charts.push(widths_chart(r, s));
    }
    let mut infos = Vec::new();
    for c in charts
        .iter()
        .filter(|c| c.series.iter().any(|s| !s.points.is_empty()))
    {
        let path = dir.join(&c.file);
        let svg = render(c).map_err(|e| Error::format(&path, format!("cannot draw: {e}")))?;
        replace_owned(&path, svg.as_bytes())?;
        infos.push(PlotInfo {
            file: format!("plots/{}", c.file),
            title: c.title.clone(),
            series: c
                .series
                .iter()
                .filter(|s| !s.points.is_empty())
                .map(|s| SeriesInfo {
                    label: s.label.clone(),
                    color: format!("#{:02x}{:02x}{:02x}", s.color.0, s.color.1, s.color.2),
                    points: s.points.len(),
                })
                .collect(),
        });
    }
    // Plots of an earlier run's sparsities or metrics would mislead.
    for e in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
        let path = e.map_err(|e| Error::io(&dir, e))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let current = |n: &String| infos.iter().any(|i| i.file == format!("plots/{n}"));
        if name.is_some_and(|n| n.ends_with(".svg") && !current(&n)) {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(infos)
}

/// A metric against sparsity: one line per method, the dense value as a
/// horizontal line across the chart. Non-finite values are left out.
fn vs_sparsity(
    r: &Report,
    file: &str,
    title: String,
    y_desc: String,
    y_axis: YAxis,
    value: impl Fn(&super::data::Evals) -> Option<f64>,
) -> Chart {
    let (lo, hi) = x_range(&r.sparsities);
    let mut series: Vec<Series> = r
        .methods
        .iter()
        .map(|m| Series {
            label: m.name.clone(),
            color: method_color(m),
            points: r
                .sparsities
                .iter()
                .filter_map(|&s| {
                    let v = value(&r.cell(&m.name, s)?.evals)?;
                    v.is_finite().then_some((s, v))
                })
                .collect(),
        })
        .collect();
    if let Some(d) = value(&r.dense).filter(|v| v.is_finite()) {
        series.push(Series {
            label: "dense".into(),
            color: REFERENCE,
            points: vec![(lo, d), (hi, d)],
        });
    }
    Chart {
        file: file.into(),
        title,
        x_desc: "FFN channels removed",
        y_desc,
        x_pct: true,
        x_labels: 10,
        y_axis,
        series,
    }
}

/// Kept FFN width of every layer, one line per method, at sparsity `s`.
fn widths_chart(r: &Report, s: f64) -> Chart {
    let per_layer = |w: &[usize]| -> Vec<(f64, f64)> {
        w.iter()
            .enumerate()
            .map(|(l, &x)| (l as f64, x as f64))
            .collect()
    };
    let mut series: Vec<Series> = r
        .methods
        .iter()
        .map(|m| Series {
            label: m.name.clone(),
            color: method_color(m),
            points: r
                .cell(&m.name, s)
                .and_then(|c| c.size.as_ref())
                .map_or(Vec::new(), |z| per_layer(&z.widths)),
        })
        .collect();
    series.push(Series {
        label: "dense".into(),
        color: REFERENCE,
        points: per_layer(&r.model.ffn_widths),
    });
    Chart {
        file: format!("widths-s{s}.svg"),
        title: format!("Kept FFN width per layer at {:.0}% sparsity", s * 100.0),
        x_desc: "layer",
        y_desc: "kept FFN channels".into(),
        x_pct: false,
        x_labels: r.model.layers.clamp(2, 16),
        y_axis: YAxis::FromZero,
        series,
    }
}

/// The sparsity axis: the requested levels with a margin.
fn x_range(sparsities: &[f64]) -> (f64, f64) {
    let lo = sparsities.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = sparsities.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    ((lo - 0.05).max(0.0), (hi + 0.05).min(1.0))
}

type DrawResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const SIZE: (u32, u32) = (860, 480);
/// Width of the legend column right of the chart.
const LEGEND_W: u32 = 150;

/// The chart as SVG text: the chart on the left, its legend in a column
/// on the right (so it never hides a line).
fn render(c: &Chart) -> DrawResult<String> {
    let shown: Vec<&Series> = c.series.iter().filter(|s| !s.points.is_empty()).collect();
    let pts = || shown.iter().flat_map(|s| s.points.iter());
    let x0 = pts().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let x1 = pts().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let y0 = pts().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y1 = pts().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let x = if x1 > x0 { x0..x1 } else { x0 - 0.5..x1 + 0.5 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(&c.title, ("sans-serif", 20))?;
        let (area, legend) = root.split_horizontally(SIZE.0 - LEGEND_W);
        let mut builder = ChartBuilder::on(&area);
        builder
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64);
        match c.y_axis {
            // A log axis only when the values span a decade; plotters puts
            // its log ticks on powers of ten and would show none otherwise.
            YAxis::Log if y1 > 10.0 * y0 => {
                let y_desc = format!("{} (log scale)", c.y_desc);
                let ctx = builder.build_cartesian_2d(x, (y0 / 1.2..y1 * 1.2).log_scale())?;
                paint(ctx, c, &y_desc)?
            }
            YAxis::Log => {
                let pad = (y1 - y0).max(y1 * 0.02) * 0.1;
                paint(
                    builder.build_cartesian_2d(x, y0 - pad..y1 + pad)?,
                    c,
                    &c.y_desc,
                )?
            }
            YAxis::Unit => paint(builder.build_cartesian_2d(x, 0.0..1.0)?, c, &c.y_desc)?,
            YAxis::FromZero => {
                let ctx = builder.build_cartesian_2d(x, 0.0..(y1 * 1.08).max(1.0))?;
                paint(ctx, c, &c.y_desc)?
            }
        }
        for (i, s) in shown.iter().enumerate() {
            let color = RGBColor(s.color.0, s.color.1, s.color.2);
            let y = 40 + 22 * i as i32;
            legend.draw(&Rectangle::new([(8, y), (20, y + 12)], color.filled()))?;
            legend.draw(&Text::new(
                s.label.clone(),
                (28, y),
                ("sans-serif", 14).into_font().color(&BLACK),
            ))?;
        }
        root.present()?;
    }
    Ok(svg)
}

/// Mesh and one polyline per series: the only polyline in a series'
/// colour is its line (the legend uses filled squares).
fn paint<'a, DB, Y>(
    mut ctx: ChartContext<'a, DB, Cartesian2d<RangedCoordf64, Y>>,
    c: &Chart,
    y_desc: &str,
) -> DrawResult<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    // The layer axis shows whole layers only.
    let x_fmt = |v: &f64| match c.x_pct {
        true => format!("{:.0}%", v * 100.0),
        false if (v - v.round()).abs() < 1e-9 => format!("{v:.0}"),
        false => String::new(),
    };
    let y_fmt = |v: &f64| match c.y_axis {
        YAxis::Unit => format!("{v:.2}"),
        _ if v.abs() < 10.0 && v.fract() != 0.0 => format!("{v:.1}"),
        _ => format!("{v:.0}"),
    };
    ctx.configure_mesh()
        .x_desc(c.x_desc)
        .x_labels(c.x_labels)
        .y_desc(y_desc)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .light_line_style(TRANSPARENT)
        .draw()?;
    for s in c.series.iter().filter(|s| !s.points.is_empty()) {
        let color = RGBColor(s.color.0, s.color.1, s.color.2);
        ctx.draw_series(LineSeries::new(s.points.clone(), color.stroke_width(2)))?;
    }
    Ok(())
}
