//! A labelled PNG of an attention map: rows are queries, columns keys, token labels on both axes,
//! a colour bar. BOS soaks up most attention, so the colour scale is set by the largest
//! non-BOS entry (BOS cells saturate); the title says so.

use ab_glyph::{FontRef, PxScale};
use image::{Rgb, RgbImage, imageops};
use imageproc::drawing::{draw_filled_rect_mut, draw_text_mut, text_size};
use imageproc::rect::Rect;

const CELL: u32 = 28;
const PAD: u32 = 12;
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([20, 20, 20]);

/// Viridis at `v` in [0, 1] (piecewise linear through 6 stops of matplotlib's map).
pub fn viridis(v: f32) -> Rgb<u8> {
    const STOPS: [[f32; 3]; 6] = [
        [68.0, 1.0, 84.0],
        [65.0, 68.0, 135.0],
        [42.0, 120.0, 142.0],
        [34.0, 168.0, 132.0],
        [122.0, 209.0, 81.0],
        [253.0, 231.0, 37.0],
    ];
    let x = v.clamp(0.0, 1.0) * (STOPS.len() - 1) as f32;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f32;
    let c = |k: usize| (STOPS[i][k] + f * (STOPS[i + 1][k] - STOPS[i][k])).round() as u8;
    Rgb([c(0), c(1), c(2)])
}

/// Render `attention` (`n x n`, lower-triangular) with `labels` (one per token) and `title`.
pub fn render(attention: &[Vec<f32>], labels: &[String], title: &str) -> RgbImage {
    let font = FontRef::try_from_slice(dejavu::sans::regular()).expect("DejaVu Sans parses");
    let scale = PxScale::from(14.0);
    let small = PxScale::from(10.0);
    let n = attention.len() as u32;
    let label_w = labels
        .iter()
        .map(|l| text_size(scale, &font, l).0)
        .max()
        .unwrap_or(0)
        + 8;
    let (title_h, bar_w) = (28, 70);
    let (x0, y0) = (PAD + label_w, PAD + title_h + label_w);
    let title_w = text_size(scale, &font, title).0 + 2 * PAD;
    let (w, h) = (
        (x0 + n * CELL + PAD + bar_w).max(title_w),
        y0 + n * CELL + PAD,
    );
    let mut img = RgbImage::from_pixel(w, h, WHITE);

    let vmax = attention
        .iter()
        .flat_map(|r| r.iter().skip(1).copied())
        .fold(f32::MIN_POSITIVE, f32::max);
    draw_text_mut(&mut img, BLACK, PAD as i32, PAD as i32, scale, &font, title);

    for (i, row) in attention.iter().enumerate() {
        for (j, &a) in row.iter().enumerate() {
            let (x, y) = (x0 + j as u32 * CELL, y0 + i as u32 * CELL);
            let rect = Rect::at(x as i32, y as i32).of_size(CELL - 1, CELL - 1);
            if j > i {
                draw_filled_rect_mut(&mut img, rect, Rgb([235, 235, 235]));
                continue;
            }
            let v = a / vmax;
            draw_filled_rect_mut(&mut img, rect, viridis(v));
            if n <= 24 {
                let txt = format!("{:.2}", a).trim_start_matches('0').to_string();
                let fg = if v > 0.6 { BLACK } else { WHITE };
                draw_text_mut(&mut img, fg, x as i32 + 3, y as i32 + 8, small, &font, &txt);
            }
        }
    }
    for (k, l) in labels.iter().enumerate() {
        let k = k as u32;
        let (tw, _) = text_size(scale, &font, l);
        // Row label, right-aligned left of the grid.
        draw_text_mut(
            &mut img,
            BLACK,
            (x0 - 6 - tw) as i32,
            (y0 + k * CELL + 6) as i32,
            scale,
            &font,
            l,
        );
        // Column label: drawn horizontally on a strip, then turned to read bottom-up.
        let mut strip = RgbImage::from_pixel(label_w, CELL, WHITE);
        draw_text_mut(
            &mut strip,
            BLACK,
            (label_w - 6 - tw) as i32,
            6,
            scale,
            &font,
            l,
        );
        let col = imageops::rotate270(&strip);
        imageops::overlay(
            &mut img,
            &col,
            (x0 + k * CELL) as i64,
            (PAD + title_h) as i64,
        );
    }
    // Colour bar from 0 (bottom) to vmax (top).
    let bx = x0 + n * CELL + PAD;
    let bh = n * CELL;
    for y in 0..bh {
        let v = 1.0 - y as f32 / bh.max(1) as f32;
        for x in bx..bx + 14 {
            img.put_pixel(x, y0 + y, viridis(v));
        }
    }
    let top = format!("{vmax:.3}");
    draw_text_mut(
        &mut img,
        BLACK,
        (bx + 18) as i32,
        y0 as i32,
        small,
        &font,
        &top,
    );
    draw_text_mut(
        &mut img,
        BLACK,
        (bx + 18) as i32,
        (y0 + bh - 10) as i32,
        small,
        &font,
        "0",
    );
    img
}

/// PNG bytes of an image.
pub fn png_bytes(img: &RgbImage) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .expect("PNG encoding to memory cannot fail");
    buf.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_follow_the_values_and_masked_cells_are_grey() {
        let a = vec![vec![1.0, 0.0], vec![0.6, 0.4]];
        let img = render(&a, &["<bos>".into(), "train".into()], "t");
        assert_eq!(viridis(0.0), Rgb([68, 1, 84]));
        assert_eq!(viridis(1.0), Rgb([253, 231, 37]));
        // Find the grid by its masked (upper-right) grey cell and compare the diagonal cells.
        let grey = Rgb([235, 235, 235]);
        let is_grey = |x: u32, y: u32| *img.get_pixel(x, y) == grey;
        let (gx, gy) = img
            .enumerate_pixels()
            .map(|(x, y, _)| (x, y))
            .find(|&(x, y)| {
                is_grey(x, y) && is_grey(x + 5, y + 5) && is_grey(x + CELL - 2, y + CELL - 2)
            })
            .expect("masked cell drawn");
        let cell_11 = *img.get_pixel(gx + 1, gy + CELL + 1);
        assert_eq!(cell_11, viridis(1.0), "A[1,1] is the largest non-BOS value");
    }
}
