//! DisenDiff's training-data augmentation (BASELINES.md section 3, "Augmentation"), the
//! Custom Diffusion recipe: every image is centre-cropped to a square, flipped with probability
//! 0.5, bicubic-resized and mapped to [-1, 1]; target images also get a random scale, which either
//! shrinks the image onto a zero canvas ("a far away ", with a loss mask on the pasted region),
//! enlarges and crops it ("zoomed in "), or leaves it at full size.
//!
//! The repository's numbers are for 512 px and SD's latent factor 8; here they are written in terms
//! of the resolution `res` the way the repository's code writes them (`size // 3`, `1.2 * size`,
//! `1.4 * size`, `0.6 * size`), so that the tiny test models (16 px, factor 2) get the same rule.
//! At 512 they are exactly the spec's 170, 512, 614, 716 and 307.2.
//!
//! Randomness comes from a [`TorchGenerator`]; the order of the draws is this module's own (it does
//! not replay numpy's), but it is fixed, so a seed gives the same crops on every run.

use decorr_pipeline::rng::TorchGenerator;
use image::RgbImage;
use image::imageops::{self, FilterType};

/// Caption prefixes of a shrunk ("far") target, drawn with probability 0.5 each.
pub const FAR_PREFIXES: [&str; 2] = ["a far away ", "very small "];
/// Caption prefixes of an enlarged ("close") target, drawn with probability 0.5 each.
pub const CLOSE_PREFIXES: [&str; 2] = ["zoomed in ", "close up "];

/// The random scale a sample got; kept so callers and tests can see what was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Resized to `res` (a target with `0.6 res <= r <= res`, or any regularisation image).
    Plain,
    /// Resized to `r x r` and pasted on a zero canvas with its centre at row `cx`, column `cy`
    /// (rows `cx - r/2 .. cx + r/2`, columns `cy - r/2 .. cy + r/2`).
    Far { r: usize, cx: usize, cy: usize },
    /// Resized to `r x r` and cropped to `res x res` with the top-left corner at row `top`,
    /// column `left`.
    Close { r: usize, top: usize, left: usize },
}

/// One augmented training sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Augmented {
    /// [3, res, res] in [-1, 1], row-major CHW.
    pub pixels: Vec<f32>,
    /// [res/factor, res/factor], 1 where the loss counts.
    pub mask: Vec<f32>,
    /// Caption prefix of the scale ("a far away ", ...), empty for none.
    pub prefix: &'static str,
    /// The scale drawn (always [`Scale::Plain`] for regularisation images).
    pub scale: Scale,
    /// Whether the image was flipped horizontally (before any resize).
    pub flipped: bool,
}

/// Augments one image for DisenDiff training.
///
/// `target` selects the target-image recipe (random scale, caption prefix, partial mask);
/// regularisation images are only cropped, flipped, resized and normalised.
///
/// # Panics
/// If `factor` is 0, `res < 16`, `res` is not a multiple of `factor`, or `img` is empty: callers
/// validate these (the scale ranges assume a few pixels of room).
pub fn augment(
    img: &RgbImage,
    res: usize,
    factor: usize,
    target: bool,
    rng: &mut TorchGenerator,
) -> Augmented {
    assert!(
        factor > 0 && res >= 16 && res.is_multiple_of(factor),
        "augment: res {res} must be >= 16 and a multiple of the latent factor {factor}"
    );
    assert!(img.width() > 0 && img.height() > 0, "augment: empty image");
    let n = res / factor;

    let mut square = centre_crop(img);
    let flipped = uniform(rng) < 0.5;
    if flipped {
        imageops::flip_horizontal_in_place(&mut square);
    }

    let (scale, prefix) = if target {
        draw_scale(res, rng)
    } else {
        (Scale::Plain, "")
    };

    let mut pixels = vec![0.0f32; 3 * res * res];
    let mask = match scale {
        Scale::Plain => {
            let resized = resize(&square, res);
            blit(&resized, (0, 0), res, &mut pixels, res, (0, 0));
            vec![1.0; n * n]
        }
        Scale::Far { r, cx, cy } => {
            let resized = resize(&square, r);
            blit(
                &resized,
                (0, 0),
                r,
                &mut pixels,
                res,
                (cx - r / 2, cy - r / 2),
            );
            far_mask(res, factor, r, cx, cy)
        }
        Scale::Close { r, top, left } => {
            let resized = resize(&square, r);
            blit(&resized, (top, left), res, &mut pixels, res, (0, 0));
            vec![1.0; n * n]
        }
    };

    Augmented {
        pixels,
        mask,
        prefix,
        scale,
        flipped,
    }
}

/// The loss mask of a "far" sample: `[res/factor, res/factor]`, 1 on rows
/// `(cx - r/2)/factor + 1 .. (cx + r/2)/factor - 1` and the same columns with `cy` (floor division,
/// end exclusive), 0 elsewhere. The one-latent-pixel margin presumably keeps the latents that the
/// VAE mixes with the grey canvas out of the loss. Separate from [`augment`] so the rule can be checked against the reference's
/// numbers. Out-of-canvas bounds are clamped (empty rows or columns give an all-zero mask).
///
/// # Panics
/// If `factor` is 0.
pub fn far_mask(res: usize, factor: usize, r: usize, cx: usize, cy: usize) -> Vec<f32> {
    assert!(factor > 0, "far_mask: latent factor must be positive");
    let n = res / factor;
    let span = |c: usize| {
        let start = c.saturating_sub(r / 2) / factor + 1;
        let end = ((c + r / 2) / factor).saturating_sub(1).min(n);
        start..end.max(start)
    };
    let (rows, cols) = (span(cx), span(cy));
    let mut mask = vec![0.0f32; n * n];
    for row in rows {
        mask[row * n + cols.start..row * n + cols.end].fill(1.0);
    }
    mask
}

/// Draws a target's scale r and, for the shrunk and enlarged cases, the position and the caption
/// prefix. The branch thresholds follow the repository: far if `r < 0.6 res`, close if `r > res`.
fn draw_scale(res: usize, rng: &mut TorchGenerator) -> (Scale, &'static str) {
    let r = draw_r(res, rng);
    if 5 * r < 3 * res {
        let prefix = FAR_PREFIXES[below(rng, 2)];
        // Centre in [r/2, res - r/2] (the repository's `randint(r // 2, size - r // 2 + 1)`):
        // the pasted square always lies fully on the canvas.
        let cx = r / 2 + below(rng, res - r + 1);
        let cy = r / 2 + below(rng, res - r + 1);
        (Scale::Far { r, cx, cy }, prefix)
    } else if r > res {
        let prefix = CLOSE_PREFIXES[below(rng, 2)];
        let top = below(rng, r - res + 1);
        let left = below(rng, r - res + 1);
        (Scale::Close { r, top, left }, prefix)
    } else {
        (Scale::Plain, "")
    }
}

/// Draws r: with probability 2/3 uniform in `[res/3, res]`, otherwise uniform in
/// `[floor(1.2 res), floor(1.4 res))` ([170, 512] and [614, 716) at 512); odd values are bumped to
/// the next even one so the image splits evenly about its centre.
fn draw_r(res: usize, rng: &mut TorchGenerator) -> usize {
    let r = if below(rng, 3) < 2 {
        let lo = res / 3;
        lo + below(rng, res - lo + 1)
    } else {
        // Integer floors of 1.2 res and 1.4 res (exact, unlike the float product).
        let (lo, hi) = (12 * res / 10, 14 * res / 10);
        lo + below(rng, hi - lo)
    };
    r + r % 2
}

/// A uniform f64 in [0, 1) from the top 53 bits of one `random64()`.
fn uniform(rng: &mut TorchGenerator) -> f64 {
    (rng.random64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A uniform integer in [0, n) (multiply-shift of one `random64()`; the bias is below 2^-50 for
/// the small n used here).
fn below(rng: &mut TorchGenerator, n: usize) -> usize {
    assert!(n > 0, "below: empty range");
    ((u128::from(rng.random64()) * n as u128) >> 64) as usize
}

/// The central square of side `min(w, h)`, offset by `(side - min) / 2` as numpy's
/// `img[(h - c)//2:(h + c)//2, (w - c)//2:(w + c)//2]` does.
fn centre_crop(img: &RgbImage) -> RgbImage {
    let (w, h) = img.dimensions();
    let side = w.min(h);
    imageops::crop_imm(img, (w - side) / 2, (h - side) / 2, side, side).to_image()
}

/// Bicubic (Catmull-Rom, PIL's `BICUBIC`) resize to `size x size`, back to u8 as PIL gives it.
fn resize(img: &RgbImage, size: usize) -> RgbImage {
    imageops::resize(img, size as u32, size as u32, FilterType::CatmullRom)
}

/// Copies the `size x size` square of `src` at `(row, col)` into the CHW canvas `dst` of side
/// `res` at `(row, col)`, normalising x/127.5 - 1 (in f64, then f32, as numpy does).
fn blit(
    src: &RgbImage,
    (src_row, src_col): (usize, usize),
    size: usize,
    dst: &mut [f32],
    res: usize,
    (dst_row, dst_col): (usize, usize),
) {
    for y in 0..size {
        for x in 0..size {
            let px = src.get_pixel((src_col + x) as u32, (src_row + y) as u32);
            let at = (dst_row + y) * res + dst_col + x;
            for (c, &v) in px.0.iter().enumerate() {
                dst[c * res * res + at] = (f64::from(v) / 127.5 - 1.0) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn ones_at(mask: &[f32], n: usize) -> Vec<(usize, usize)> {
        (0..n * n)
            .filter(|&i| mask[i] != 0.0)
            .map(|i| (i / n, i % n))
            .collect()
    }

    fn solid(w: u32, h: u32, v: u8) -> RgbImage {
        RgbImage::from_pixel(w, h, Rgb([v, v, v]))
    }

    /// A non-symmetric test image: a gradient in x and y per channel.
    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([
                (x * 255 / (w - 1).max(1)) as u8,
                (y * 255 / (h - 1).max(1)) as u8,
                ((x * 7 + y * 13) % 256) as u8,
            ])
        })
    }

    #[test]
    fn far_mask_matches_reference_numbers() {
        // tests/fixtures/disendiff README choice 2: r = 8 at 16 px, factor 2.
        let m = far_mask(16, 2, 8, 5, 10);
        assert_eq!(m.len(), 64);
        assert_eq!(ones_at(&m, 8), vec![(1, 4), (1, 5), (2, 4), (2, 5)]);
        let m = far_mask(16, 2, 8, 11, 5);
        assert_eq!(ones_at(&m, 8), vec![(4, 1), (4, 2), (5, 1), (5, 2)]);
        assert!(m.iter().all(|&v| v == 0.0 || v == 1.0));
    }

    #[test]
    fn far_mask_at_sd_scale_and_clamped() {
        // 512 px, factor 8, r = 200 centred: rows/cols 156/8+1 = 20 .. 356/8-1 = 43.
        let m = far_mask(512, 8, 200, 256, 256);
        let ones = ones_at(&m, 64);
        assert_eq!(ones.len(), 23 * 23);
        assert_eq!(ones.first(), Some(&(20, 20)));
        assert_eq!(ones.last(), Some(&(42, 42)));
        // Out-of-range centres neither panic nor write outside.
        assert_eq!(far_mask(16, 2, 8, 0, 0).len(), 64);
        assert_eq!(far_mask(16, 2, 8, 100, 100).iter().sum::<f32>(), 0.0);
        assert_eq!(far_mask(16, 2, 2, 8, 8).iter().sum::<f32>(), 0.0);
    }

    #[test]
    fn helpers_stay_in_range() {
        let mut rng = TorchGenerator::new(7);
        for _ in 0..1000 {
            let u = uniform(&mut rng);
            assert!((0.0..1.0).contains(&u));
            assert!(below(&mut rng, 5) < 5);
            assert_eq!(below(&mut rng, 1), 0);
        }
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            counts[below(&mut rng, 3)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (900..1100).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn r_draw_ranges_and_branch_frequencies() {
        for res in [16usize, 32, 64, 512] {
            let (lo1, hi1) = (res / 3, res);
            let (lo2, hi2) = (12 * res / 10, 14 * res / 10);
            let (mut small, total) = (0usize, 3000usize);
            let (mut min1, mut max1, mut min2, mut max2) = (usize::MAX, 0, usize::MAX, 0);
            for seed in 0..total as u64 {
                let r = draw_r(res, &mut TorchGenerator::new(seed));
                assert_eq!(r % 2, 0, "res {res} seed {seed}: odd r {r}");
                if r <= res {
                    assert!((lo1..=hi1 + 1).contains(&r), "res {res}: r {r}");
                    small += 1;
                    (min1, max1) = (min1.min(r), max1.max(r));
                } else {
                    // The even bump can take hi2 - 1 to hi2.
                    assert!((lo2..=hi2).contains(&r), "res {res}: r {r}");
                    (min2, max2) = (min2.min(r), max2.max(r));
                }
            }
            let frac = small as f64 / total as f64;
            assert!((frac - 2.0 / 3.0).abs() < 0.03, "res {res}: {frac}");
            assert!(min1 <= lo1 + 1 && max1 == hi1, "res {res}: {min1}..{max1}");
            assert!(
                min2 <= lo2 + 1 && max2 >= hi2 - 1,
                "res {res}: {min2}..{max2}"
            );
        }
        // At 512 the ranges are the spec's numbers.
        assert_eq!((512 / 3, 12 * 512 / 10, 14 * 512 / 10), (170, 614, 716));
    }

    #[test]
    fn scale_kinds_occur_with_their_positions_in_range() {
        let res = 512;
        let (mut far, mut close, mut plain) = (0, 0, 0);
        for seed in 0..3000u64 {
            match draw_scale(res, &mut TorchGenerator::new(seed)) {
                (Scale::Far { r, cx, cy }, p) => {
                    far += 1;
                    assert!(FAR_PREFIXES.contains(&p));
                    assert!(5 * r < 3 * res && r >= 170);
                    for c in [cx, cy] {
                        assert!(c >= r / 2 && c + r / 2 <= res, "r {r} c {c}");
                    }
                }
                (Scale::Close { r, top, left }, p) => {
                    close += 1;
                    assert!(CLOSE_PREFIXES.contains(&p));
                    assert!(r > res && top + res <= r && left + res <= r);
                }
                (Scale::Plain, p) => {
                    plain += 1;
                    assert_eq!(p, "");
                }
            }
        }
        // P(close) = 1/3; P(far) = 2/3 * (r in [170, 306]: 137/343 of the draws).
        assert!((close as f64 / 3000.0 - 1.0 / 3.0).abs() < 0.03, "{close}");
        let p_far = 2.0 / 3.0 * 137.0 / 343.0;
        assert!((far as f64 / 3000.0 - p_far).abs() < 0.03, "{far}");
        assert!(plain > 0);
    }

    #[test]
    fn output_lengths() {
        let img = gradient(23, 17);
        for (res, factor) in [(16, 2), (32, 8), (64, 8), (24, 4)] {
            for target in [false, true] {
                for seed in 0..20 {
                    let a = augment(&img, res, factor, target, &mut TorchGenerator::new(seed));
                    assert_eq!(a.pixels.len(), 3 * res * res);
                    assert_eq!(a.mask.len(), (res / factor) * (res / factor));
                    assert!(a.pixels.iter().all(|v| (-1.0..=1.0).contains(v)));
                    assert!(a.mask.iter().all(|&v| v == 0.0 || v == 1.0));
                }
            }
        }
    }

    #[test]
    fn far_paste_lies_inside_the_canvas() {
        let (res, factor) = (32usize, 2usize);
        let n = res / factor;
        let white = solid(40, 40, 255);
        let mut seen = 0;
        for seed in 0..300u64 {
            let a = augment(&white, res, factor, true, &mut TorchGenerator::new(seed));
            let Scale::Far { r, cx, cy } = a.scale else {
                continue;
            };
            seen += 1;
            assert!(FAR_PREFIXES.contains(&a.prefix));
            let (rows, cols) = (cx - r / 2..cx + r / 2, cy - r / 2..cy + r / 2);
            for c in 0..3 {
                for y in 0..res {
                    for x in 0..res {
                        let v = a.pixels[c * res * res + y * res + x];
                        let inside = rows.contains(&y) && cols.contains(&x);
                        assert_eq!(v, if inside { 1.0 } else { 0.0 }, "({y}, {x})");
                    }
                }
            }
            assert_eq!(a.mask, far_mask(res, factor, r, cx, cy));
            for (my, mx) in ones_at(&a.mask, n) {
                assert!(rows.contains(&(my * factor)) && cols.contains(&(mx * factor)));
                assert!(rows.contains(&(my * factor + factor - 1)));
                assert!(cols.contains(&(mx * factor + factor - 1)));
            }
            assert!(a.mask.contains(&1.0));
        }
        assert!(seen > 30, "{seen}");
    }

    #[test]
    fn close_and_plain_targets() {
        let (res, factor) = (16usize, 2usize);
        let img = gradient(21, 21);
        let (mut close, mut plain) = (0, 0);
        for seed in 0..200u64 {
            let mut rng = TorchGenerator::new(seed);
            let a = augment(&img, res, factor, true, &mut rng);
            match a.scale {
                Scale::Close { r, top, left } => {
                    close += 1;
                    assert!(CLOSE_PREFIXES.contains(&a.prefix));
                    assert!(a.mask.iter().all(|&v| v == 1.0));
                    // The output is the (top, left) window of the flipped image resized to r.
                    let mut sq = img.clone();
                    if a.flipped {
                        imageops::flip_horizontal_in_place(&mut sq);
                    }
                    let big = resize(&sq, r);
                    let px = big.get_pixel((left + 3) as u32, (top + 5) as u32);
                    let want = (f64::from(px.0[1]) / 127.5 - 1.0) as f32;
                    assert_eq!(a.pixels[res * res + 5 * res + 3], want);
                }
                Scale::Plain => {
                    plain += 1;
                    assert_eq!(a.prefix, "");
                    assert!(a.mask.iter().all(|&v| v == 1.0));
                }
                Scale::Far { .. } => {}
            }
        }
        assert!(close > 30 && plain > 10, "{close} {plain}");
    }

    #[test]
    fn regularisation_images_are_plain() {
        let img = gradient(30, 30);
        for seed in 0..50u64 {
            let a = augment(&img, 16, 2, false, &mut TorchGenerator::new(seed));
            assert_eq!(a.scale, Scale::Plain);
            assert_eq!(a.prefix, "");
            assert!(a.mask.iter().all(|&v| v == 1.0));
        }
        // Normalisation endpoints: 0 -> -1, 255 -> 1.
        let mut rng = TorchGenerator::new(0);
        let a = augment(&solid(20, 20, 0), 16, 2, false, &mut rng);
        assert!(a.pixels.iter().all(|&v| v == -1.0));
        let a = augment(&solid(20, 20, 255), 16, 2, false, &mut rng);
        assert!(a.pixels.iter().all(|&v| v == 1.0));
    }

    #[test]
    fn flip_happens_about_half_the_time() {
        // Left half black, right half white: a flip puts white at column 0.
        let img = RgbImage::from_fn(32, 32, |x, _| {
            let v = if x < 16 { 0 } else { 255 };
            Rgb([v, v, v])
        });
        let mut flips = 0;
        let total = 1000;
        for seed in 0..total as u64 {
            let a = augment(&img, 16, 2, false, &mut TorchGenerator::new(seed));
            let (first, last) = (a.pixels[0], a.pixels[15]);
            if a.flipped {
                flips += 1;
                assert!(first > 0.9 && last < -0.9, "{first} {last}");
            } else {
                assert!(first < -0.9 && last > 0.9, "{first} {last}");
            }
        }
        assert!((400..600).contains(&flips), "{flips}");
    }

    #[test]
    fn deterministic_for_a_seed() {
        let img = gradient(37, 29);
        for seed in 0..20u64 {
            let a = augment(&img, 32, 4, true, &mut TorchGenerator::new(seed));
            let b = augment(&img, 32, 4, true, &mut TorchGenerator::new(seed));
            assert_eq!(a, b);
        }
        // The generator advances: consecutive samples differ.
        let mut rng = TorchGenerator::new(3);
        let draws: Vec<_> = (0..10)
            .map(|_| augment(&img, 32, 4, true, &mut rng))
            .collect();
        assert!(draws.windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn non_square_input_is_centre_cropped() {
        // White centre square, black bands on the long side: only white survives the crop.
        let wide = RgbImage::from_fn(30, 20, |x, _| {
            let v = if (5..25).contains(&x) { 255 } else { 0 };
            Rgb([v, v, v])
        });
        let tall = RgbImage::from_fn(20, 31, |_, y| {
            // (31 - 20) / 2 = 5: rows 5..25 are kept, as numpy's slice keeps them.
            let v = if (5..25).contains(&y) { 255 } else { 0 };
            Rgb([v, v, v])
        });
        for img in [&wide, &tall] {
            assert_eq!(centre_crop(img).dimensions(), (20, 20));
            for seed in 0..10u64 {
                let a = augment(img, 16, 2, false, &mut TorchGenerator::new(seed));
                assert!(a.pixels.iter().all(|&v| v == 1.0));
            }
        }
    }

    #[test]
    fn tiny_and_odd_inputs_do_not_panic() {
        for (w, h) in [(1, 1), (3, 7), (7, 3), (2, 1), (513, 200)] {
            let img = gradient(w, h);
            for seed in 0..10u64 {
                let a = augment(&img, 16, 2, true, &mut TorchGenerator::new(seed));
                assert_eq!(a.pixels.len(), 3 * 16 * 16);
            }
        }
    }

    #[test]
    #[should_panic(expected = "multiple of the latent factor")]
    fn rejects_res_not_divisible_by_factor() {
        augment(&solid(8, 8, 0), 18, 4, false, &mut TorchGenerator::new(0));
    }
}
