//! The PNG of `cargo xtask bench`: achieved throughput and p99 latency against the offered
//! rate, one line per backend. plotters draws into an RGB buffer (bitmap backend, no
//! encoder feature) and `png` writes the file. Text needs a TrueType font file, registered
//! with plotters' `ab_glyph` support; without one the plot is drawn without any text.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

const WIDTH: u32 = 1000;
const HEIGHT: u32 = 900;
/// Points of the curved achieved = offered line.
const IDEAL_POINTS: u32 = 64;
const COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// One line of the plot: a backend's steps as (offered req/s, achieved req/s, p99 ms).
pub struct Curve {
    pub name: String,
    pub points: Vec<(f64, f64, f64)>,
}

/// Whether the plot got its text.
pub enum Text {
    Drawn,
    /// No usable font: the plot has lines and grid only; the reason is given.
    Missing(String),
}

/// Draws the plot into `path`; text is drawn with the font at `font` when it loads.
pub fn draw(path: &Path, curves: &[Curve], font: &Path) -> Result<Text> {
    let text = match register(font) {
        Ok(()) => Text::Drawn,
        Err(e) => Text::Missing(format!("{e:#}")),
    };
    let with_text = matches!(text, Text::Drawn);
    let (w, h) = (WIDTH as usize, HEIGHT as usize);
    let mut rgb = vec![0_u8; w * h * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let (upper, lower) = root.split_vertically(HEIGHT / 2);
        throughput(&upper, curves, with_text)?;
        p99(&lower, curves, with_text)?;
        root.present().map_err(plot_error)?;
    }
    write_png(path, &rgb)?;
    Ok(text)
}

/// Reads the font and registers it as plotters' sans-serif (the only family used).
fn register(font: &Path) -> Result<()> {
    let bytes = std::fs::read(font).with_context(|| format!("reading {}", font.display()))?;
    // plotters keeps fonts for the life of the process; the one file is leaked once.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{} is not a usable TrueType/OpenType font", font.display()))
}

/// The offered rates of the steps, ascending: the labelled ticks of the x axis.
fn rate_ticks(curves: &[Curve]) -> Vec<f64> {
    let mut rates: Vec<f64> = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.0))
        .collect();
    rates.sort_by(f64::total_cmp);
    rates.dedup();
    rates
}

/// 1, 2, 5, 10, 20, 50, ... (and tenths below 1) within `lo..=hi`: ticks of a log axis.
fn one_two_five(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut decade = 0.1;
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let t = decade * m;
            if (lo..=hi).contains(&t) {
                ticks.push(t);
            }
        }
        decade *= 10.0;
    }
    ticks
}

/// The offered-rate axis: logarithmic, a little wider than the steps.
fn rate_range(curves: &[Curve]) -> (f64, f64) {
    let rates = curves.iter().flat_map(|c| c.points.iter().map(|p| p.0));
    let lo = rates.clone().fold(f64::INFINITY, f64::min);
    let hi = rates.fold(0.0, f64::max);
    if lo.is_finite() && hi > lo {
        (lo / 1.25, hi * 1.25)
    } else {
        (10.0, 10_000.0)
    }
}

fn throughput(
    area: &DrawingArea<BitMapBackend, Shift>,
    curves: &[Curve],
    text: bool,
) -> Result<()> {
    let (lo, hi) = rate_range(curves);
    let top = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.0.max(p.1)))
        .fold(1.0, f64::max)
        * 1.1;
    let mut builder = ChartBuilder::on(area);
    builder.margin(15);
    if text {
        builder
            .caption("Achieved throughput vs offered rate", ("sans-serif", 22))
            .x_label_area_size(45)
            .y_label_area_size(70);
    }
    let mut chart = builder
        .build_cartesian_2d(
            (lo..hi).log_scale().with_key_points(rate_ticks(curves)),
            0.0..top,
        )
        .map_err(plot_error)?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("offered rate (requests/s, log scale)")
            .y_desc("achieved (requests/s)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style(("sans-serif", 15));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(plot_error)?;
    // What a server that keeps up would do: achieved = offered (a curve on this log-x axis).
    let ideal = chart
        .draw_series(DashedLineSeries::new(
            (0..=IDEAL_POINTS).map(|i| {
                let x = lo * (hi / lo).powf(f64::from(i) / f64::from(IDEAL_POINTS));
                (x, x)
            }),
            6,
            4,
            ShapeStyle::from(&BLACK.mix(0.5)).stroke_width(1),
        ))
        .map_err(plot_error)?;
    if text {
        ideal
            .label("offered (keeping up)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.5)));
    }
    draw_curves(&mut chart, curves, text, |p| (p.0, p.1))
}

fn p99(area: &DrawingArea<BitMapBackend, Shift>, curves: &[Curve], text: bool) -> Result<()> {
    let (lo, hi) = rate_range(curves);
    let ms = curves.iter().flat_map(|c| c.points.iter().map(|p| p.2));
    let bottom = ms.clone().fold(f64::INFINITY, f64::min).max(0.1) / 2.0;
    let top = ms.fold(1.0, f64::max) * 2.0;
    let bottom = if bottom.is_finite() && bottom < top {
        bottom
    } else {
        0.1
    };
    let mut builder = ChartBuilder::on(area);
    builder.margin(15);
    if text {
        builder
            .caption("p99 latency vs offered rate", ("sans-serif", 22))
            .x_label_area_size(45)
            .y_label_area_size(70);
    }
    let mut chart = builder
        .build_cartesian_2d(
            (lo..hi).log_scale().with_key_points(rate_ticks(curves)),
            (bottom..top)
                .log_scale()
                .with_key_points(one_two_five(bottom, top)),
        )
        .map_err(plot_error)?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("offered rate (requests/s, log scale)")
            .y_desc("p99 latency (ms, log scale)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y}"))
            .label_style(("sans-serif", 15));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(plot_error)?;
    draw_curves(&mut chart, curves, text, |p| (p.0, p.2.max(bottom)))
}

/// One line per curve, its points taken by `xy` from the curve's steps, and with text the
/// legend of every line drawn so far (the throughput chart's ideal line among them).
fn draw_curves<'a, 'b: 'a, X, Y>(
    chart: &mut ChartContext<'a, BitMapBackend<'b>, Cartesian2d<X, Y>>,
    curves: &[Curve],
    text: bool,
    xy: impl Fn(&(f64, f64, f64)) -> (f64, f64),
) -> Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (i, curve) in curves.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let line = chart
            .draw_series(
                LineSeries::new(curve.points.iter().map(&xy), colour.stroke_width(3)).point_size(4),
            )
            .map_err(plot_error)?;
        if text {
            line.label(curve.name.as_str()).legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(3))
            });
        }
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()
            .map_err(plot_error)?;
    }
    Ok(())
}

fn write_png(path: &Path, rgb: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().context("writing the PNG header")?;
    writer
        .write_image_data(rgb)
        .context("writing the PNG data")?;
    writer.finish().context("finishing the PNG")?;
    Ok(())
}

/// plotters' errors borrow nothing but are not all `Send + Sync`; keep their text.
fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the plot: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_axis_spans_every_step_with_a_margin() {
        let curves = [Curve {
            name: "a".into(),
            points: vec![(100.0, 99.0, 3.0), (1600.0, 700.0, 900.0)],
        }];
        let (lo, hi) = rate_range(&curves);
        assert!(lo < 100.0 && hi > 1600.0);
    }

    #[test]
    fn latency_ticks_go_one_two_five() {
        assert_eq!(one_two_five(3.0, 120.0), [5.0, 10.0, 20.0, 50.0, 100.0]);
    }

    #[test]
    fn a_plot_without_a_font_is_still_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        let curves = [Curve {
            name: "sqlite".into(),
            points: vec![
                (100.0, 99.0, 3.0),
                (200.0, 198.0, 4.0),
                (400.0, 300.0, 900.0),
            ],
        }];
        let text = draw(&path, &curves, &dir.path().join("no-such-font.ttf")).unwrap();
        assert!(matches!(text, Text::Missing(_)));
        assert!(std::fs::metadata(&path).unwrap().len() > 1000);
    }
}
