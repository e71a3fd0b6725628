//! Charts as PNG: the training curves of `losses.png` (the paper's figure 8), one panel per
//! quantity, epoch on x, the selected epoch marked; and the bar panels of `decorr eval`'s
//! `report.png` (one bar per method, interval whiskers where known).

use ab_glyph::{FontRef, PxScale};
use image::{Rgb, RgbImage};
use imageproc::drawing::{draw_filled_circle_mut, draw_line_segment_mut, draw_text_mut};

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([30, 30, 30]);
const GRID: Rgb<u8> = Rgb([220, 220, 220]);
const LINE: Rgb<u8> = Rgb([31, 119, 180]);
const MARK: Rgb<u8> = Rgb([214, 39, 40]);

/// One panel: a named series of values at x = 1, 2, ...
pub struct Series<'a> {
    pub name: &'a str,
    pub values: Vec<f64>,
}

/// Panels in a grid of two columns; `selected` (1-based x) is drawn as a red line and dot.
pub fn panels(
    title: &str,
    x_label: &str,
    series: &[Series<'_>],
    selected: Option<usize>,
) -> RgbImage {
    let font = FontRef::try_from_slice(dejavu::sans::regular()).expect("DejaVu Sans parses");
    let (pw, ph, top) = (420u32, 260u32, 36u32);
    let rows = series.len().div_ceil(2) as u32;
    let mut img = RgbImage::from_pixel(pw * 2, top + ph * rows, WHITE);
    draw_text_mut(&mut img, INK, 12, 10, PxScale::from(16.0), &font, title);
    for (k, s) in series.iter().enumerate() {
        let (ox, oy) = ((k as u32 % 2) * pw, top + (k as u32 / 2) * ph);
        panel(&mut img, &font, ox, oy, pw, ph, s, x_label, selected);
    }
    img
}

#[allow(clippy::too_many_arguments)]
fn panel(
    img: &mut RgbImage,
    font: &FontRef<'_>,
    ox: u32,
    oy: u32,
    w: u32,
    h: u32,
    s: &Series<'_>,
    x_label: &str,
    selected: Option<usize>,
) {
    let small = PxScale::from(11.0);
    let (l, r, t, b) = (
        ox as f32 + 70.0,
        (ox + w) as f32 - 16.0,
        oy as f32 + 28.0,
        (oy + h) as f32 - 36.0,
    );
    draw_text_mut(
        img,
        INK,
        ox as i32 + 70,
        oy as i32 + 6,
        PxScale::from(14.0),
        font,
        s.name,
    );
    let finite: Vec<f64> = s.values.iter().copied().filter(|v| v.is_finite()).collect();
    let (mut lo, mut hi) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    if finite.is_empty() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        (lo, hi) = (lo - 0.5 * lo.abs().max(1e-6), hi + 0.5 * hi.abs().max(1e-6));
    }
    let n = s.values.len().max(2);
    let x = |i: usize| l + (r - l) * (i as f32 - 1.0) / (n as f32 - 1.0).max(1.0);
    let y = |v: f64| b - (b - t) * ((v - lo) / (hi - lo)) as f32;
    for k in 0..=4 {
        let v = lo + (hi - lo) * k as f64 / 4.0;
        draw_line_segment_mut(img, (l, y(v)), (r, y(v)), GRID);
        let label = if hi - lo < 1e-3 {
            format!("{v:.2e}")
        } else {
            format!("{v:.4}")
        };
        draw_text_mut(
            img,
            INK,
            ox as i32 + 4,
            y(v) as i32 - 6,
            small,
            font,
            &label,
        );
    }
    draw_line_segment_mut(img, (l, t), (l, b), INK);
    draw_line_segment_mut(img, (l, b), (r, b), INK);
    let step = s.values.len().div_ceil(10).max(1);
    for i in (1..=s.values.len()).step_by(step) {
        draw_text_mut(
            img,
            INK,
            x(i) as i32 - 4,
            b as i32 + 4,
            small,
            font,
            &i.to_string(),
        );
    }
    draw_text_mut(
        img,
        INK,
        ((l + r) / 2.0) as i32 - 16,
        b as i32 + 18,
        small,
        font,
        x_label,
    );
    if let Some(e) = selected.filter(|&e| e >= 1 && e <= s.values.len()) {
        draw_line_segment_mut(img, (x(e), t), (x(e), b), MARK);
    }
    let pts: Vec<(usize, f64)> = (1..)
        .zip(s.values.iter().copied())
        .filter(|(_, v)| v.is_finite())
        .collect();
    for w in pts.windows(2) {
        draw_line_segment_mut(img, (x(w[0].0), y(w[0].1)), (x(w[1].0), y(w[1].1)), LINE);
    }
    for &(i, v) in &pts {
        let c = if Some(i) == selected { MARK } else { LINE };
        draw_filled_circle_mut(img, (x(i) as i32, y(v) as i32), 3, c);
    }
}

/// One bar panel: a value per method, with an optional interval per bar.
pub struct Bars<'a> {
    pub name: &'a str,
    pub labels: Vec<String>,
    pub values: Vec<f64>,
    pub intervals: Vec<Option<(f64, f64)>>,
}

const PALETTE: [Rgb<u8>; 4] = [
    Rgb([127, 127, 127]),
    Rgb([31, 119, 180]),
    Rgb([44, 160, 44]),
    Rgb([255, 127, 14]),
];

/// Bar panels side by side; non-finite values are left out (labelled n/a).
pub fn bars(title: &str, panels: &[Bars<'_>]) -> RgbImage {
    let font = FontRef::try_from_slice(dejavu::sans::regular()).expect("DejaVu Sans parses");
    let (pw, ph, top) = (340u32, 300u32, 36u32);
    let mut img = RgbImage::from_pixel(pw * panels.len().max(1) as u32, top + ph, WHITE);
    draw_text_mut(&mut img, INK, 12, 10, PxScale::from(16.0), &font, title);
    let small = PxScale::from(11.0);
    for (k, p) in panels.iter().enumerate() {
        let ox = k as f32 * pw as f32;
        let (l, r, t, b) = (
            ox + 56.0,
            ox + pw as f32 - 16.0,
            top as f32 + 30.0,
            (top + ph) as f32 - 40.0,
        );
        draw_text_mut(
            &mut img,
            INK,
            l as i32,
            top as i32 + 4,
            PxScale::from(14.0),
            &font,
            p.name,
        );
        let hi = p
            .values
            .iter()
            .chain(p.intervals.iter().flatten().map(|(_, h)| h))
            .copied()
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max);
        let hi = if hi <= 0.0 { 1.0 } else { hi * 1.1 };
        let y = |v: f64| b - (b - t) * (v / hi) as f32;
        for g in 0..=4 {
            let v = hi * g as f64 / 4.0;
            draw_line_segment_mut(&mut img, (l, y(v)), (r, y(v)), GRID);
            draw_text_mut(
                &mut img,
                INK,
                ox as i32 + 4,
                y(v) as i32 - 6,
                small,
                &font,
                &format!("{v:.3}"),
            );
        }
        draw_line_segment_mut(&mut img, (l, t), (l, b), INK);
        draw_line_segment_mut(&mut img, (l, b), (r, b), INK);
        let n = p.values.len().max(1) as f32;
        let slot = (r - l) / n;
        for (i, (label, &v)) in p.labels.iter().zip(&p.values).enumerate() {
            let x0 = l + slot * i as f32 + slot * 0.2;
            let x1 = l + slot * (i as f32 + 1.0) - slot * 0.2;
            if v.is_finite() && v > 0.0 {
                let rect = imageproc::rect::Rect::at(x0 as i32, y(v) as i32)
                    .of_size((x1 - x0).max(1.0) as u32, (b - y(v)).max(1.0) as u32);
                imageproc::drawing::draw_filled_rect_mut(
                    &mut img,
                    rect,
                    PALETTE[i % PALETTE.len()],
                );
            }
            if let Some(Some((lo, up))) = p.intervals.get(i) {
                let xm = (x0 + x1) / 2.0;
                draw_line_segment_mut(&mut img, (xm, y(*lo)), (xm, y(*up)), INK);
                for v in [lo, up] {
                    draw_line_segment_mut(&mut img, (xm - 5.0, y(*v)), (xm + 5.0, y(*v)), INK);
                }
            }
            let text = if v.is_finite() {
                format!("{v:.3}")
            } else {
                "n/a".into()
            };
            draw_text_mut(&mut img, INK, x0 as i32, b as i32 + 4, small, &font, label);
            draw_text_mut(&mut img, INK, x0 as i32, b as i32 + 18, small, &font, &text);
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selected_epoch_is_marked_red() {
        let s = [Series {
            name: "L_val",
            values: vec![3.0, 1.0, 2.0],
        }];
        let img = panels("t", "epoch", &s, Some(2));
        assert!(img.pixels().any(|p| *p == MARK));
        assert!(img.pixels().any(|p| *p == LINE));
        let none = panels("t", "epoch", &s, None);
        assert!(!none.pixels().any(|p| *p == MARK));
    }

    #[test]
    fn bars_draw_one_colour_per_method_and_skip_missing_values() {
        let p = [Bars {
            name: "omission rate",
            labels: vec!["sd".into(), "decorrelated".into(), "x".into()],
            values: vec![0.8, 0.2, f64::NAN],
            intervals: vec![Some((0.6, 0.9)), None, None],
        }];
        let img = bars("t", &p);
        assert!(img.pixels().any(|c| *c == PALETTE[0]));
        assert!(img.pixels().any(|c| *c == PALETTE[1]));
        assert!(!img.pixels().any(|c| *c == PALETTE[2]), "NaN bar drawn");
    }
}
