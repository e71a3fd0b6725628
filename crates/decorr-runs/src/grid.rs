//! Labelled image grids: the side-by-side comparison of `decorr fix` (rows: methods, columns:
//! seeds) and the cross-attention-over-time figure of `decorr generate --attention-maps` (rows:
//! tokens, columns: steps).

use ab_glyph::{FontRef, PxScale};
use image::{Rgb, RgbImage, imageops};
use imageproc::drawing::{draw_text_mut, text_size};

use crate::heatmap::viridis;

const PAD: u32 = 8;
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([20, 20, 20]);

/// A grid of equally sized `cells[row][col]` with a title, row and column labels. Cells smaller
/// than `min_cell` pixels are enlarged (nearest) so tiny images stay visible.
pub fn labelled(
    title: &str,
    rows: &[String],
    cols: &[String],
    cells: &[Vec<RgbImage>],
    min_cell: u32,
) -> RgbImage {
    let font = FontRef::try_from_slice(dejavu::sans::regular()).expect("DejaVu Sans parses");
    let scale = PxScale::from(14.0);
    let (cw0, ch0) = cells
        .iter()
        .flatten()
        .next()
        .map_or((min_cell, min_cell), |c| c.dimensions());
    let f = (min_cell as f32 / cw0.min(ch0).max(1) as f32)
        .ceil()
        .max(1.0) as u32;
    let (cw, ch) = (cw0 * f, ch0 * f);
    let row_w = rows
        .iter()
        .map(|l| text_size(scale, &font, l).0)
        .max()
        .unwrap_or(0)
        + PAD;
    let (title_h, col_h) = (26, 20);
    let ncols = cells.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let w = (PAD + row_w + ncols * (cw + PAD)).max(text_size(scale, &font, title).0 + 2 * PAD);
    let h = PAD + title_h + col_h + rows.len() as u32 * (ch + PAD);
    let mut img = RgbImage::from_pixel(w, h, WHITE);
    draw_text_mut(&mut img, BLACK, PAD as i32, PAD as i32, scale, &font, title);
    let y0 = PAD + title_h + col_h;
    for (j, label) in cols.iter().enumerate() {
        let x = PAD + row_w + j as u32 * (cw + PAD);
        draw_text_mut(
            &mut img,
            BLACK,
            x as i32,
            (PAD + title_h) as i32,
            scale,
            &font,
            label,
        );
    }
    for (i, row) in cells.iter().enumerate() {
        let y = y0 + i as u32 * (ch + PAD);
        if let Some(label) = rows.get(i) {
            draw_text_mut(
                &mut img,
                BLACK,
                PAD as i32,
                (y + ch / 2 - 7) as i32,
                scale,
                &font,
                label,
            );
        }
        for (j, cell) in row.iter().enumerate() {
            let big = imageops::resize(cell, cw, ch, imageops::FilterType::Nearest);
            let x = PAD + row_w + j as u32 * (cw + PAD);
            imageops::overlay(&mut img, &big, x as i64, y as i64);
        }
    }
    img
}

/// A `height x width` map (row-major) in viridis, stretched from its minimum to its maximum.
pub fn heat(map: &[f32], height: usize, width: usize) -> RgbImage {
    let lo = map.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = map.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let span = (hi - lo).max(f32::MIN_POSITIVE);
    RgbImage::from_fn(width as u32, height as u32, |x, y| {
        viridis((map[y as usize * width + x as usize] - lo) / span)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_places_cells_and_enlarges_small_ones() {
        let red = RgbImage::from_pixel(4, 4, Rgb([255, 0, 0]));
        let img = labelled(
            "t",
            &["a".into()],
            &["1".into(), "2".into()],
            &[vec![red.clone(), red]],
            32,
        );
        let reds = img.pixels().filter(|p| **p == Rgb([255, 0, 0])).count();
        assert_eq!(reds, 2 * 32 * 32, "two cells enlarged to 32x32");
        let h = heat(&[0.0, 1.0], 1, 2);
        assert_eq!(*h.get_pixel(1, 0), viridis(1.0));
    }
}
