//! Charts, drawn with plotters as SVG and rasterized to PNG with resvg: the training curves of
//! `losses.svg`/`losses.png` (the paper's figure 8), one panel per quantity, step or epoch on
//! x, the selected epoch marked red; and the bar panels of `decorr eval`'s and the study's
//! `report.svg`/`report.png` (one bar per method, interval whiskers where known).
//!
//! Making them needs no system font (plotters' font features would want fontconfig): the SVG
//! names the generic `sans-serif`, which the viewer draws with its own font, and the PNG's text
//! is DejaVu Sans from the `dejavu` crate, loaded into resvg's font database.

use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use decorr_core::io::write_atomic;
use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use resvg::{tiny_skia, usvg};

use crate::error::{Context, Result, RunsError};
use crate::heatmap::png_bytes;

const INK: RGBColor = RGBColor(30, 30, 30);
const GRID: RGBColor = RGBColor(225, 225, 225);
const LINE: RGBColor = RGBColor(31, 119, 180);
const MARK: RGBColor = RGBColor(214, 39, 40);

/// One bar colour per method, in the callers' method order (the baseline first, in grey).
/// Red is left out: on these pages red means "selected".
const PALETTE: [RGBColor; 9] = [
    RGBColor(127, 127, 127),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The generic family the SVG names; the rasterizer maps it to the embedded DejaVu Sans.
const FAMILY: &str = "sans-serif";

/// A chart as SVG text and the same chart as PNG bytes.
pub struct Chart {
    pub svg: String,
    pub png: Vec<u8>,
}

impl Chart {
    /// Writes `dir/STEM.svg`, then `dir/STEM.png` (the file folder checks look for), each
    /// atomically.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<()> {
        for (ext, bytes) in [("svg", self.svg.as_bytes()), ("png", &self.png[..])] {
            let path = dir.join(format!("{stem}.{ext}"));
            write_atomic(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

/// One panel of curves: a named series of values at x = 1, 2, ...
pub struct Series<'a> {
    /// The panel's title.
    pub name: &'a str,
    /// The y axis's description (the quantity, with its unit if it has one).
    pub y_label: &'a str,
    pub values: Vec<f64>,
}

/// The text style of the charts at `px` pixels. plotters writes `font-size` as size / 1.24,
/// so the size is scaled to get `px` in the SVG.
fn font(px: f64) -> TextStyle<'static> {
    (FAMILY, px * 1.24).into_font().color(&INK)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type Drawn<T = ()> = std::result::Result<T, DrawingAreaErrorKind<std::io::Error>>;

/// Draws `size` pixels with `draw` into an SVG and rasterizes it.
fn chart(size: (u32, u32), draw: impl FnOnce(&Area<'_>) -> Drawn) -> Result<Chart> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE)
            .and_then(|()| draw(&root))
            .and_then(|()| root.present())
            .map_err(|e| RunsError::Msg(format!("drawing a chart: {e}")))?;
    }
    let png = rasterize(&svg)?;
    Ok(Chart { svg, png })
}

/// Panels in a grid of two columns (one wide panel for a single series), under `title`;
/// `selected` (1-based x) is drawn as a red line and dot and named in a legend.
pub fn panels(
    title: &str,
    x_label: &str,
    series: &[Series<'_>],
    selected: Option<usize>,
) -> Result<Chart> {
    let cols = if series.len() <= 1 { 1 } else { 2 };
    let rows = series.len().div_ceil(cols).max(1);
    let (pw, ph) = if cols == 1 { (900, 340) } else { (480, 300) };
    chart((pw * cols as u32, 36 + ph * rows as u32), |root| {
        let body = root.titled(title, font(17.0))?;
        for (s, area) in series.iter().zip(body.split_evenly((rows, cols))) {
            panel(&area, s, x_label, selected)?;
        }
        Ok(())
    })
}

fn panel(area: &Area<'_>, s: &Series<'_>, x_label: &str, selected: Option<usize>) -> Drawn {
    let n = s.values.len();
    let y = padded(s.values.iter().copied(), 0.06);
    let pad = ((n.max(1) - 1) as f64 * 0.03).max(0.5);
    let x = (1.0 - pad)..(n.max(1) as f64 + pad);
    let x_ticks = integer_ticks(n.max(1))
        .into_iter()
        .map(|t| t as f64)
        .collect();
    let (y_ticks, y_fmt) = value_ticks(&y);
    let mut c = ChartBuilder::on(area)
        .caption(s.name, font(14.0))
        .margin(8)
        .margin_right(16)
        .x_label_area_size(44)
        .y_label_area_size(76)
        .build_cartesian_2d(
            Ticked::new(x.clone(), x_ticks),
            Ticked::new(y.clone(), y_ticks),
        )?;
    c.configure_mesh()
        .x_desc(x_label)
        .y_desc(s.y_label)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&y_fmt)
        .bold_line_style(GRID)
        .axis_style(INK)
        .label_style(font(11.0))
        .axis_desc_style(font(12.0))
        .draw()?;
    let runs = finite_runs(&s.values);
    // A gap (a non-finite value) breaks the line rather than bridging it.
    for (k, run) in runs.iter().enumerate() {
        // One point is no line (a one-point polyline is an invalid SVG shape): its dot stands
        // for it, in the legend too.
        let drawn = if run.len() >= 2 {
            c.draw_series(LineSeries::new(run.clone(), LINE.stroke_width(2)))?
        } else {
            c.draw_series(run.iter().map(|&p| Circle::new(p, 3, LINE.filled())))?
        };
        if k == 0 {
            drawn
                .label(s.y_label)
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], LINE.stroke_width(2)));
        }
    }
    // Dots for the epochs; a long run of steps is a line alone.
    if n <= 60 {
        c.draw_series(
            runs.iter()
                .flatten()
                .map(|&p| Circle::new(p, 3, LINE.filled())),
        )?;
    }
    if let Some(e) = selected.filter(|&e| e >= 1 && e <= n) {
        let xe = e as f64;
        c.draw_series(std::iter::once(PathElement::new(
            vec![(xe, y.start), (xe, y.end)],
            MARK.stroke_width(1),
        )))?
        .label(format!("selected {x_label} {e}"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], MARK.stroke_width(2)));
        if let Some(&v) = s.values.get(e - 1).filter(|v| v.is_finite()) {
            c.draw_series(std::iter::once(Circle::new((xe, v), 5, MARK.filled())))?;
        }
        // Where the legend covers least of the curve (segments' midpoints count too).
        let occupied: Vec<(f64, f64)> = runs
            .iter()
            .flat_map(|r| {
                let mids = r
                    .windows(2)
                    .map(|w| ((w[0].0 + w[1].0) / 2.0, (w[0].1 + w[1].1) / 2.0));
                r.iter().copied().chain(mids)
            })
            .collect();
        c.configure_series_labels()
            .position(free_corner(&occupied, &x, &y, CORNERS))
            .label_font(font(11.0))
            .background_style(WHITE.mix(0.85))
            .border_style(GRID)
            .draw()?;
    }
    Ok(())
}

/// Where a legend may go, in order of preference.
const CORNERS: &[SeriesLabelPosition] = &[
    SeriesLabelPosition::UpperRight,
    SeriesLabelPosition::UpperLeft,
    SeriesLabelPosition::LowerRight,
    SeriesLabelPosition::LowerLeft,
];

/// The first of `corners` with the fewest of `points` in it (a corner: half the width, a third
/// of the height), for a legend that hides as little as possible.
fn free_corner(
    points: &[(f64, f64)],
    x: &Range<f64>,
    y: &Range<f64>,
    corners: &[SeriesLabelPosition],
) -> SeriesLabelPosition {
    let inside = |corner: &SeriesLabelPosition, &(px, py): &(f64, f64)| {
        let fx = (px - x.start) / (x.end - x.start);
        let fy = (py - y.start) / (y.end - y.start);
        let (right, upper) = match corner {
            SeriesLabelPosition::UpperLeft => (false, true),
            SeriesLabelPosition::LowerRight => (true, false),
            SeriesLabelPosition::LowerLeft => (false, false),
            _ => (true, true),
        };
        (if right { fx > 0.5 } else { fx < 0.5 }) && (if upper { fy > 0.66 } else { fy < 0.34 })
    };
    corners
        .iter()
        .min_by_key(|c| points.iter().filter(|p| inside(c, p)).count())
        .cloned()
        .unwrap_or(SeriesLabelPosition::UpperRight)
}

/// One bar panel: a value per method, with an optional interval per bar.
pub struct Bars<'a> {
    /// The panel's title.
    pub name: &'a str,
    /// The y axis's description.
    pub y_label: &'a str,
    /// The methods, in the order of the bars.
    pub labels: Vec<String>,
    pub values: Vec<f64>,
    pub intervals: Vec<Option<(f64, f64)>>,
    /// What the whiskers are (the legend's entry), e.g. "95% interval".
    pub interval_label: &'a str,
}

/// Bar panels side by side under `title`, one colour per method (the same in every panel);
/// a non-finite value draws no bar and is labelled n/a.
pub fn bars(title: &str, panels: &[Bars<'_>]) -> Result<Chart> {
    let (pw, ph) = (400u32, 340u32);
    chart((pw * panels.len().max(1) as u32, 36 + ph), |root| {
        let body = root.titled(title, font(17.0))?;
        for (p, area) in panels
            .iter()
            .zip(body.split_evenly((1, panels.len().max(1))))
        {
            bar_panel(&area, p)?;
        }
        Ok(())
    })
}

fn bar_panel(area: &Area<'_>, p: &Bars<'_>) -> Drawn {
    let n = p.values.len().max(1);
    let ends = p
        .values
        .iter()
        .copied()
        .chain(p.intervals.iter().flatten().flat_map(|&(a, b)| [a, b]))
        .filter(|v| v.is_finite());
    // Bars start at 0, so 0 is in range; the top keeps room for the value labels and legend.
    let (lo, hi) = ends.fold((0.0f64, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
    let hi = if hi <= lo { lo + 1.0 } else { hi };
    let span = hi - lo;
    let y = (if lo < 0.0 { lo - 0.05 * span } else { 0.0 })..(hi + 0.3 * span);
    let x = -0.5..n as f64 - 0.5;
    let x_ticks = (0..n).map(|i| i as f64).collect();
    let (y_ticks, y_fmt) = value_ticks(&y);
    let labels = &p.labels;
    let x_fmt = |v: &f64| {
        let i = v.round();
        (i >= 0.0)
            .then(|| labels.get(i as usize))
            .flatten()
            .cloned()
            .unwrap_or_default()
    };
    let mut c = ChartBuilder::on(area)
        .caption(p.name, font(14.0))
        .margin(8)
        .margin_right(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(
            Ticked::new(x.clone(), x_ticks),
            Ticked::new(y.clone(), y_ticks),
        )?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_desc("method")
        .y_desc(p.y_label)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .bold_line_style(GRID)
        .axis_style(INK)
        .label_style(font(11.0))
        .axis_desc_style(font(12.0))
        .draw()?;
    let digits = decimals(span / 5.0) + 1;
    let mut whiskers = false;
    // Each bar's top with its label, for the legend's place.
    let mut tops = Vec::new();
    for (i, &v) in p.values.iter().enumerate() {
        let xi = i as f64;
        let interval = p
            .intervals
            .get(i)
            .copied()
            .flatten()
            .filter(|(a, b)| a.is_finite() && b.is_finite());
        if v.is_finite() {
            let colour = PALETTE[i % PALETTE.len()];
            c.draw_series(std::iter::once(Rectangle::new(
                [(xi - 0.32, 0.0), (xi + 0.32, v)],
                colour.filled(),
            )))?;
        }
        if let Some((a, b)) = interval {
            let caps = |y: f64| PathElement::new(vec![(xi - 0.1, y), (xi + 0.1, y)], INK);
            let drawn = c.draw_series([
                PathElement::new(vec![(xi, a), (xi, b)], INK.stroke_width(1)),
                caps(a),
                caps(b),
            ])?;
            if !whiskers && !p.interval_label.is_empty() {
                drawn.label(p.interval_label).legend(|(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(10, -6), (10, 6)], INK)
                        + PathElement::new(vec![(6, -6), (14, -6)], INK)
                        + PathElement::new(vec![(6, 6), (14, 6)], INK)
                });
                whiskers = true;
            }
        }
        let top = [v, interval.map_or(f64::NAN, |(_, b)| b), 0.0]
            .into_iter()
            .filter(|v| v.is_finite())
            .fold(f64::NEG_INFINITY, f64::max);
        let text = if v.is_finite() {
            format!("{v:.digits$}")
        } else {
            "n/a".into()
        };
        tops.push((xi, top + 0.08 * (y.end - y.start)));
        let style = font(11.0).pos(Pos::new(HPos::Center, VPos::Bottom));
        c.draw_series(std::iter::once(
            EmptyElement::at((xi, top)) + Text::new(text, (0, -4), style),
        ))?;
    }
    if whiskers {
        let corners = &[
            SeriesLabelPosition::UpperRight,
            SeriesLabelPosition::UpperLeft,
        ];
        c.configure_series_labels()
            .position(free_corner(&tops, &x, &y, corners))
            .label_font(font(11.0))
            .background_style(WHITE.mix(0.85))
            .border_style(GRID)
            .draw()?;
    }
    Ok(())
}

/// An f64 axis with ticks exactly at given values (epochs, steps, one per bar). plotters'
/// own `with_key_points` over f64 cannot draw a mesh (no label formatter for it).
struct Ticked {
    inner: RangedCoordf64,
    ticks: Vec<f64>,
}

impl Ticked {
    fn new(range: Range<f64>, ticks: Vec<f64>) -> Ticked {
        Ticked {
            inner: range.into(),
            ticks,
        }
    }
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.inner.range()
    }
}

/// The finite values' range with `margin` of it added on both sides; a flat or empty series
/// gets a range around its value (or 0..1), never an empty one.
fn padded(values: impl Iterator<Item = f64>, margin: f64) -> Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if lo > hi {
        return 0.0..1.0;
    }
    let span = hi - lo;
    if !span.is_finite() {
        return lo..hi;
    }
    if span < 1e-12 * lo.abs().max(1.0) {
        let d = 0.5 * lo.abs().max(1e-6);
        return (lo - d)..(hi + d);
    }
    (lo - margin * span)..(hi + margin * span)
}

/// Ticks at 1 and at multiples of a round step (1, 2, 5, 10, 20, ...), about ten in all.
fn integer_ticks(n: usize) -> Vec<usize> {
    let mut step = 1;
    for k in [1, 2, 5].into_iter().cycle().scan(1usize, |scale, m| {
        let s = scale.saturating_mul(m);
        if m == 5 {
            *scale = scale.saturating_mul(10);
        }
        Some(s)
    }) {
        step = k;
        if n / k <= 10 {
            break;
        }
    }
    if step == 1 {
        return (1..=n).collect();
    }
    std::iter::once(1)
        .chain((step..=n).step_by(step).filter(|&t| t > step / 2))
        .collect()
}

/// Decimals that tell values `step` apart (0 to 8).
fn decimals(step: f64) -> usize {
    if !(step.is_finite() && step > 0.0) {
        return 3;
    }
    (-step.log10().floor()).clamp(0.0, 8.0) as usize
}

/// Round ticks over `range` (a step of 1, 2 or 5 times a power of ten, at most seven ticks)
/// and their labels: as many decimals as the step needs, or scientific notation for values
/// of very large or very small magnitude.
fn value_ticks(range: &Range<f64>) -> (Vec<f64>, impl Fn(&f64) -> String + use<>) {
    let span = range.end - range.start;
    let mut ticks = Vec::new();
    let mut step = f64::NAN;
    if span.is_finite() && span > 0.0 {
        let raw = span / 6.0;
        let power = 10f64.powf(raw.log10().floor());
        step = [1.0, 2.0, 5.0, 10.0]
            .into_iter()
            .map(|m| m * power)
            .find(|&s| s >= raw)
            .unwrap_or(10.0 * power);
        let first = (range.start / step).ceil();
        // Multiples of the step (no accumulated rounding), at most eight of them.
        ticks = (0..8)
            .map(|k| (first + k as f64) * step)
            .take_while(|&t| t <= range.end + 1e-9 * span)
            .collect();
    }
    let magnitude = range.start.abs().max(range.end.abs());
    let scientific = magnitude >= 1e5 || (magnitude > 0.0 && magnitude < 1e-3);
    let precision = if scientific && step.is_finite() {
        (magnitude.log10().floor() - step.log10().floor()).clamp(0.0, 6.0) as usize
    } else {
        decimals(step)
    };
    let format = move |v: &f64| {
        if *v == 0.0 {
            "0".to_string()
        } else if scientific {
            format!("{v:.precision$e}")
        } else {
            format!("{v:.precision$}")
        }
    };
    (ticks, format)
}

/// Runs of consecutive finite values as (x, value) points, x from 1.
fn finite_runs(values: &[f64]) -> Vec<Vec<(f64, f64)>> {
    let mut runs = vec![Vec::new()];
    for (i, &v) in (1..).zip(values) {
        if v.is_finite() {
            runs.last_mut().expect("never empty").push((i as f64, v));
        } else if runs.last().is_some_and(|r| !r.is_empty()) {
            runs.push(Vec::new());
        }
    }
    runs.retain(|r| !r.is_empty());
    runs
}

/// resvg's font database: DejaVu Sans alone, also as the generic sans-serif (and the default
/// family), so the PNG never depends on the fonts of the machine.
fn fonts() -> Arc<usvg::fontdb::Database> {
    static FONTS: OnceLock<Arc<usvg::fontdb::Database>> = OnceLock::new();
    FONTS
        .get_or_init(|| {
            let mut db = usvg::fontdb::Database::new();
            db.load_font_source(usvg::fontdb::Source::Binary(Arc::new(
                dejavu::sans::regular(),
            )));
            db.set_sans_serif_family("DejaVu Sans");
            Arc::new(db)
        })
        .clone()
}

/// The SVG as an opaque RGB PNG of the same size in pixels.
fn rasterize(svg: &str) -> Result<Vec<u8>> {
    let options = usvg::Options {
        fontdb: fonts(),
        font_family: "DejaVu Sans".into(),
        ..Default::default()
    };
    let tree = usvg::Tree::from_str(svg, &options)
        .map_err(|e| RunsError::Msg(format!("rasterizing a chart: the SVG: {e}")))?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height()).ok_or_else(|| {
        RunsError::Msg(format!(
            "rasterizing a chart: {}x{} pixels is too large",
            size.width(),
            size.height()
        ))
    })?;
    pixmap.fill(tiny_skia::Color::WHITE);
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    // Opaque after the white fill, so premultiplied RGBA is plain RGB plus alpha 255.
    let rgb = pixmap
        .data()
        .chunks_exact(4)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    let img = image::RgbImage::from_raw(size.width(), size.height(), rgb)
        .context("rasterizing a chart: the pixel buffer has the wrong size")?;
    Ok(png_bytes(&img))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RED: image::Rgb<u8> = image::Rgb([MARK.0, MARK.1, MARK.2]);

    fn decode(png: &[u8]) -> image::RgbImage {
        image::load_from_memory(png).unwrap().to_rgb8()
    }

    /// Columns holding a pixel of exactly `c`.
    fn columns(img: &image::RgbImage, c: image::Rgb<u8>) -> Vec<u32> {
        let mut xs: Vec<u32> = img
            .enumerate_pixels()
            .filter(|(_, _, p)| **p == c)
            .map(|(x, _, _)| x)
            .collect();
        xs.sort_unstable();
        xs.dedup();
        xs
    }

    #[test]
    fn selected_epoch_is_marked_red() {
        let s = [Series {
            name: "L_val (Eq. 5)",
            y_label: "L_val",
            values: vec![3.0, 1.0, 2.0],
        }];
        let chart = panels("t", "epoch", &s, Some(2)).unwrap();
        assert!(chart.svg.contains("#D62728"), "marker in the SVG");
        assert!(chart.svg.contains("selected epoch 2"), "legend entry");
        assert!(chart.svg.contains(">\nepoch\n<") || chart.svg.contains(">epoch<"));
        let img = decode(&chart.png);
        // Epoch 2 of 1..3 is mid-plot: the leftmost red (the marker; the legend is right).
        let red = columns(&img, RED);
        let left = *red.first().expect("a red pixel") as f64 / img.width() as f64;
        assert!((0.4..0.6).contains(&left), "marker at {left} of the width");
        assert!(columns(&img, image::Rgb([LINE.0, LINE.1, LINE.2])).len() > 100);
        let none = panels("t", "epoch", &s, None).unwrap();
        assert!(columns(&decode(&none.png), RED).is_empty());
        assert!(!none.svg.contains("#D62728"));
    }

    #[test]
    fn text_is_drawn_with_the_embedded_font() {
        let s = [Series {
            name: "x",
            y_label: "y",
            values: vec![1.0, 2.0],
        }];
        let blank = panels("", "", &s, None).unwrap();
        let titled = panels("A long title to show", "", &s, None).unwrap();
        let ink = |png: &[u8]| decode(png).pixels().filter(|p| p.0[0] < 100).count();
        assert!(
            ink(&titled.png) > ink(&blank.png) + 200,
            "the title has glyphs"
        );
        // A prompt in a title is text, never markup, in the SVG and for the rasterizer.
        let odd = panels("<b>\"rusty\" & 'old'</b>", "", &s, None).unwrap();
        assert!(odd.svg.contains("&lt;b&gt;"), "{}", odd.svg);
    }

    #[test]
    fn gaps_and_empty_series_draw_without_panicking() {
        let s = [
            Series {
                name: "a",
                y_label: "a",
                values: vec![f64::NAN, 1.0, f64::INFINITY, 2.0, 2.0],
            },
            Series {
                name: "b",
                y_label: "b",
                values: vec![],
            },
            Series {
                name: "c",
                y_label: "c",
                values: vec![5.0; 3],
            },
        ];
        let chart = panels("t", "step", &s, Some(9)).unwrap();
        assert!(!chart.svg.contains("NaN"));
        assert_eq!(finite_runs(&s[0].values).len(), 2);
        assert!(bars("empty", &[]).is_ok());
        // One epoch (or an isolated value) is a dot, never a one-point polyline, which SVG
        // readers reject (and resvg warns about on stderr).
        let one = [Series {
            name: "one",
            y_label: "one",
            values: vec![0.5],
        }];
        let svg = panels("t", "epoch", &one, Some(1)).unwrap().svg;
        let lone = svg
            .split("<polyline")
            .skip(1)
            .filter(|p| {
                let pts = p.split("points=\"").nth(1).unwrap_or("");
                let pts = &pts[..pts.find('"').unwrap_or(0)];
                pts.split_whitespace().count() < 2
            })
            .count();
        assert_eq!(lone, 0, "{svg}");
    }

    #[test]
    fn bars_draw_one_colour_per_method_and_skip_missing_values() {
        let p = [Bars {
            name: "omission rate",
            y_label: "share of images",
            labels: vec!["sd".into(), "decorrelated".into(), "x".into()],
            values: vec![0.8, 0.2, f64::NAN],
            intervals: vec![Some((0.6, 0.9)), None, None],
            interval_label: "95% interval",
        }];
        let chart = bars("t", &p).unwrap();
        let img = decode(&chart.png);
        let px = |c: RGBColor| image::Rgb([c.0, c.1, c.2]);
        assert!(!columns(&img, px(PALETTE[0])).is_empty());
        assert!(!columns(&img, px(PALETTE[1])).is_empty());
        assert!(columns(&img, px(PALETTE[2])).is_empty(), "NaN bar drawn");
        for text in ["decorrelated", "n/a", "0.80", "95% interval", "method"] {
            assert!(chart.svg.contains(text), "{text} missing");
        }
    }

    #[test]
    fn ticks_and_labels() {
        assert_eq!(integer_ticks(3), [1, 2, 3]);
        assert_eq!(integer_ticks(20), [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]);
        assert_eq!(integer_ticks(500)[..3], [1, 50, 100]);
        let (ticks, f) = value_ticks(&(0.0..1.0));
        assert_eq!(ticks, [0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]);
        assert_eq!(
            ticks.iter().map(f).collect::<Vec<_>>(),
            ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]
        );
        let (ticks, f) = value_ticks(&(-0.021..0.001));
        assert_eq!(ticks.len(), 5, "{ticks:?}");
        assert_eq!(f(&-0.005), "-0.005");
        let (_, f) = value_ticks(&(1.5e-5..3.1e-5));
        assert_eq!(f(&2e-5), "2.0e-5");
        assert!(value_ticks(&(0.0..0.0)).0.is_empty());
    }
}
