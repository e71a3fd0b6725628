//! Fréchet Inception Distance as pytorch-fid 0.3.0 computes it (`pytorch_fid.fid_score`):
//! images of a folder → FID Inception pool features ([`crate::inception`]) → mean and
//! covariance ([`ActivationStats`]) → Fréchet distance between two such Gaussians
//! ([`frechet_distance`]). Statistics can be saved to and read from pytorch-fid-compatible
//! `.npz` files ([`crate::npz`]).
//!
//! Folder reading follows pytorch-fid: files whose names end in `.bmp .jpg .jpeg .pgm .png .ppm
//! .tif .tiff .webp` (lower case, as its glob), sorted by name, converted to RGB as PIL's
//! `.convert('RGB')` does (grey replicated, alpha dropped) and scaled to [0, 1] as `ToTensor`.
//! Decoding uses the `image` crate: 8-bit PNG is bit-exact with PIL; JPEG (zune-jpeg, not PIL's
//! libjpeg) differs by a few levels at most (tests: max 3/255, mean 0.15/255); other formats
//! of the list (bmp, pgm, ppm, tif, webp) are reported by file as not readable by this build.
//! All images of a folder must have one size (pytorch-fid batches them and fails otherwise;
//! this is checked before any network work).

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use nalgebra::DMatrix;
use rayon::prelude::*;

use crate::EvalError;
use crate::inception::{FEATURE_DIM, FidInception};

// In `crate::stats` so that `crate::npz` can read and write it without depending on this
// module; re-exported here, where FID's users have always found it.
pub use crate::stats::ActivationStats;

/// Extensions pytorch-fid collects (`IMAGE_EXTENSIONS`), matched case-sensitively like its glob.
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp",
];

/// pytorch-fid's default `--batch-size`.
pub const DEFAULT_BATCH_SIZE: usize = 50;

/// The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
/// `|mu1 - mu2|² + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2))`, in f64.
///
/// pytorch-fid evaluates `tr(sqrtm(sigma1 @ sigma2))` with scipy's Schur-based `sqrtm` of the
/// non-symmetric product (adding 1e-6 to the diagonals when that fails). Here the trace comes
/// from a symmetric eigenproblem instead: with sigma1 = B Bᵀ (Cholesky factor, or the
/// symmetric square root when sigma1 is singular), sigma1 sigma2 = B (Bᵀ sigma2 B) B⁻¹ is
/// similar to the symmetric PSD matrix M = Bᵀ sigma2 B (for singular sigma1, AB and BA still
/// share their eigenvalues; and as sigma2 sigma1 has the eigenvalues of sigma1 sigma2, the
/// roles may be swapped to use whichever is positive definite), so the eigenvalues λᵢ of
/// sigma1 sigma2 are real and ≥ 0, the
/// principal square root scipy returns has eigenvalues √λᵢ, and its trace is Σ √λᵢ. Round-off
/// can push tiny λᵢ below zero; they are clamped to 0 (scipy would return a small imaginary
/// part that pytorch-fid drops). The two agree to ~1e-9 relative on well- and ill-conditioned
/// covariances (tests/fid.rs), and this form never needs the diagonal offset.
pub fn frechet_distance(a: &ActivationStats, b: &ActivationStats) -> Result<f64, EvalError> {
    if a.dim() != b.dim() {
        return Err(EvalError::Input(format!(
            "the two statistics have different dimensions ({} and {}): they come from \
             different feature layers and cannot be compared",
            a.dim(),
            b.dim()
        )));
    }
    a.check("first statistics")?;
    b.check("second statistics")?;
    let d = a.dim();
    if d == 0 {
        return Err(EvalError::Input(
            "the statistics are empty (dimension 0)".into(),
        ));
    }
    let s1 = DMatrix::from_row_slice(d, d, &a.sigma);
    let s2 = DMatrix::from_row_slice(d, d, &b.sigma);
    let diff: f64 = a.mu.iter().zip(&b.mu).map(|(x, y)| (x - y) * (x - y)).sum();
    let tr_covmean = trace_sqrt_product(&s1, &s2);
    Ok(diff + s1.trace() + s2.trace() - 2.0 * tr_covmean)
}

/// tr(sqrtm(s1 s2)) for symmetric PSD s1, s2 (see [`frechet_distance`]).
fn trace_sqrt_product(s1: &DMatrix<f64>, s2: &DMatrix<f64>) -> f64 {
    let s1 = (s1 + s1.transpose()) * 0.5;
    let s2 = (s2 + s2.transpose()) * 0.5;
    // B with s = B Bᵀ for one of the two (s1 s2 and s2 s1 share their eigenvalues): a Cholesky
    // factor (cheap; a reference set of many images is positive definite even when the
    // generated set is too small to be), else the symmetric root from an eigendecomposition.
    let (b, other) = if let Some(c) = s1.clone().cholesky() {
        (c.l(), s2)
    } else if let Some(c) = s2.clone().cholesky() {
        (c.l(), s1)
    } else {
        let e = nalgebra::SymmetricEigen::new(s1);
        let roots = e.eigenvalues.map(|l| l.max(0.0).sqrt());
        let root = &e.eigenvectors * DMatrix::from_diagonal(&roots) * e.eigenvectors.transpose();
        (root, s2)
    };
    let m = b.transpose() * other * &b;
    let m = (&m + m.transpose()) * 0.5;
    m.symmetric_eigenvalues()
        .iter()
        .map(|l| l.max(0.0).sqrt())
        .sum()
}

/// The image files of `dir` pytorch-fid would use, sorted by name.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>, EvalError> {
    if !dir.is_dir() {
        return Err(EvalError::Input(format!(
            "{} is not a folder of images (or an .npz statistics file)",
            dir.display()
        )));
    }
    let io = |source| EvalError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if IMAGE_EXTENSIONS.contains(&ext) && path.is_file() {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    if files.is_empty() {
        return Err(EvalError::Input(format!(
            "{} holds no images (files ending in .{})",
            dir.display(),
            IMAGE_EXTENSIONS.join(", .")
        )));
    }
    Ok(files)
}

/// An RGB image as `ToTensor` gives it: `[3, height, width]` values in [0, 1].
#[derive(Debug, Clone)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

/// Decode `path` (format recognised by content), convert to RGB as PIL's `.convert('RGB')`
/// and scale to [0, 1] as torchvision's `ToTensor` (`x / 255` in f32). 8-bit grey, grey+alpha,
/// palette, RGB and RGBA PNGs match PIL exactly (tests/fid.rs); 16-bit PNGs are scaled to 8
/// bits by the image crate, where PIL clips 16-bit grey, so those can differ.
pub fn read_image(path: &Path) -> Result<RgbImage, EvalError> {
    let bad = |message: String| EvalError::BadFile {
        path: path.to_path_buf(),
        message,
    };
    // Read through decorr-core: a FIFO or a device named `*.png` is refused, not waited on.
    let bytes = decorr_core::input::read_image_bytes(path, "an image")?;
    let img = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|source| EvalError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .decode()
        .map_err(|e| {
            bad(format!(
                "cannot decode the image ({e}); this build reads PNG and JPEG: convert the folder to PNG"
            ))
        })?
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let raw = img.into_raw();
    let mut data = vec![0f32; 3 * w * h];
    for (p, px) in raw.chunks_exact(3).enumerate() {
        for c in 0..3 {
            data[c * w * h + p] = px[c] as f32 / 255.0;
        }
    }
    Ok(RgbImage {
        width: w,
        height: h,
        data,
    })
}

/// Check that all `files` have one size (from their headers), naming two that differ.
fn check_same_size(files: &[PathBuf]) -> Result<(u32, u32), EvalError> {
    let dims = |p: &Path| {
        image::image_dimensions(p).map_err(|e| EvalError::BadFile {
            path: p.to_path_buf(),
            message: format!(
                "cannot read the image size ({e}); this build reads PNG and JPEG: convert the folder to PNG"
            ),
        })
    };
    let first = dims(&files[0])?;
    for f in &files[1..] {
        let d = dims(f)?;
        if d != first {
            return Err(EvalError::Input(format!(
                "images of one folder must have one size (pytorch-fid batches them): {} is \
                 {}x{} but {} is {}x{} (width x height); resize them first",
                files[0].display(),
                first.0,
                first.1,
                f.display(),
                d.0,
                d.1
            )));
        }
    }
    Ok(first)
}

/// Pool features of `files` (`[n * 2048]`, row per image, in order), `batch_size` images per
/// forward pass. All files must have one size.
pub fn features_of_files(
    model: &FidInception,
    files: &[PathBuf],
    batch_size: usize,
    device: &Device,
) -> Result<Vec<f32>, EvalError> {
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let (w, h) = check_same_size(files)?;
    let (w, h) = (w as usize, h as usize);
    let mut out = Vec::with_capacity(files.len() * FEATURE_DIM);
    for chunk in files.chunks(batch_size.max(1)) {
        let images: Vec<RgbImage> = chunk
            .par_iter()
            .map(|p| read_image(p))
            .collect::<Result<_, _>>()?;
        let mut data = Vec::with_capacity(images.len() * 3 * w * h);
        for (img, path) in images.iter().zip(chunk) {
            // The header said one size; a file that decodes to another is still caught.
            if (img.width, img.height) != (w, h) {
                return Err(EvalError::BadFile {
                    path: path.clone(),
                    message: format!(
                        "decodes to {}x{}, its header and the folder say {w}x{h}",
                        img.width, img.height
                    ),
                });
            }
            data.extend_from_slice(&img.data);
        }
        let x = Tensor::<4>::from_data(TensorData::new(data, [images.len(), 3, h, w]), device);
        let feats = model.features(x).into_data();
        let feats = feats.try_to_vec::<f32>().map_err(|e| {
            EvalError::Input(format!("reading features back from the device: {e:?}"))
        })?;
        out.extend_from_slice(&feats);
    }
    Ok(out)
}

/// pytorch-fid's `calculate_activation_statistics` of the images in `dir`.
pub fn folder_stats(
    model: &FidInception,
    dir: &Path,
    batch_size: usize,
    device: &Device,
) -> Result<ActivationStats, EvalError> {
    stats_of_files(model, dir, &list_images(dir)?, batch_size, device)
}

/// [`folder_stats`] of `files`, the images listed in `dir`.
fn stats_of_files(
    model: &FidInception,
    dir: &Path,
    files: &[PathBuf],
    batch_size: usize,
    device: &Device,
) -> Result<ActivationStats, EvalError> {
    if files.len() < 2 {
        return Err(EvalError::Input(format!(
            "{} holds only {} image; FID statistics need at least 2 (the covariance of one \
             sample is undefined)",
            dir.display(),
            files.len()
        )));
    }
    let feats = features_of_files(model, files, batch_size, device)?;
    ActivationStats::from_features(&feats, FEATURE_DIM)
}

/// Whether `path` names a statistics file rather than an image folder (pytorch-fid's test:
/// the name ends in `.npz`).
pub fn is_stats_file(path: &Path) -> bool {
    path.to_string_lossy().ends_with(".npz")
}

/// Statistics of `path` as pytorch-fid takes either: a `.npz` of saved statistics is read; a
/// folder's images are listed first and only then run through the network `model` gives, so a
/// bad path is reported, and saved statistics compared, without loading any weights.
pub fn stats_of_path<E: From<EvalError>>(
    path: &Path,
    model: impl FnOnce() -> Result<FidInception, E>,
    batch_size: usize,
    device: &Device,
) -> Result<ActivationStats, E> {
    if is_stats_file(path) {
        return Ok(crate::npz::read_stats(path)?);
    }
    if !path.is_dir() {
        return Err(EvalError::Input(format!(
            "{} is neither a folder of images nor an .npz of statistics",
            path.display()
        ))
        .into());
    }
    let files = list_images(path)?;
    let model = model()?;
    Ok(stats_of_files(&model, path, &files, batch_size, device)?)
}
