//! FID parity with pytorch-fid 0.3.0 (fixtures from tests/pyref/make_fid_fixtures.py): the FID
//! Inception features with deterministic synthetic weights, the Fréchet distance, mean /
//! covariance statistics, `.npz` files both ways, weight loading (.pth and safetensors) and the
//! errors a user can run into.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;
use decorr_convert::{DType, StateDict, Tensor as HostTensor};
use decorr_eval::fid::{
    self, ActivationStats, features_of_files, folder_stats, frechet_distance, list_images,
};
use decorr_eval::inception::{
    FEATURE_DIM, FidInception, load_inception, synthetic_weight, weight_shapes,
};
use decorr_eval::npz;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/fid")
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("reference.json")).unwrap())
        .unwrap()
}

fn host(shape: &[usize], v: &[f32]) -> HostTensor {
    HostTensor {
        dtype: DType::F32,
        shape: shape.to_vec(),
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn synthetic_state_dict() -> StateDict {
    weight_shapes()
        .iter()
        .enumerate()
        .map(|(k, (name, shape))| (name.clone(), host(shape, &synthetic_weight(k, name, shape))))
        .collect()
}

/// The synthetic network, loaded through a safetensors file like a user's weights.
fn synthetic_model(device: &Device) -> FidInception {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fid_inception.safetensors");
    decorr_convert::tensor::write_safetensors(&path, &synthetic_state_dict()).unwrap();
    load_inception(&path, device).unwrap()
}

fn read_f32(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    decorr_core::weights::read_tensors_f32(path)
        .unwrap()
        .remove(name)
        .unwrap()
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-300);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

#[test]
fn weight_names_and_shapes_follow_pytorch_fid_state_dict() {
    let want: Vec<(String, Vec<usize>)> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("params.json")).unwrap())
            .unwrap();
    let got = weight_shapes();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w);
    }
    // 5 tensors per BasicConv2d; the network has 94 of them, 21.8M weights.
    assert_eq!(got.len(), 94 * 5);
}

#[test]
fn features_match_pytorch_fid() {
    let device = decorr_core::device_from_env();
    let model = synthetic_model(&device);
    let (shape, want) = read_f32(&fixtures().join("features.safetensors"), "features");
    assert_eq!(shape, vec![7, FEATURE_DIM]);
    let mut got = Vec::new();
    let mut names = Vec::new();
    // 64x48 images (upscaled to 299 by the bilinear resize) in one batch; 299x299 (no resize)
    // in batches of one, so batching cannot matter; 512x384 (downscaled).
    for (sub, batch) in [("small", 4), ("large", 1), ("big", 1)] {
        let files = list_images(&fixtures().join(sub)).unwrap();
        names.extend(
            files
                .iter()
                .map(|f| format!("{sub}/{}", f.file_name().unwrap().to_string_lossy())),
        );
        got.extend(features_of_files(&model, &files, batch, &device).unwrap());
    }
    let ref_names: Vec<String> = serde_json::from_value(reference()["images"].clone()).unwrap();
    assert_eq!(
        names, ref_names,
        "folder order is pytorch-fid's sorted order"
    );
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    // The features differ between images by up to ~0.19 and reach ~0.86: the tolerance is far
    // below what a wrong pool, padding or resize produces.
    eprintln!("FID Inception features: max abs error {err:.3e} (tolerance 1e-4)");
    assert!(err <= 1e-4, "max abs feature error {err}");
}

#[test]
fn frechet_distance_matches_pytorch_fid() {
    let r = reference();
    for tag in ["a", "b"] {
        let s1 = npz::read_stats(&fixtures().join(format!("{tag}1.npz"))).unwrap();
        let s2 = npz::read_stats(&fixtures().join(format!("{tag}2.npz"))).unwrap();
        let want = r[format!("fid_{tag}")].as_f64().unwrap();
        let t = Instant::now();
        let got = frechet_distance(&s1, &s2).unwrap();
        let rel = (got - want).abs() / want.abs();
        eprintln!(
            "FID dim {}: {got} vs pytorch-fid {want}: rel error {rel:.2e} (tolerance 1e-5), {:?}",
            s1.dim(),
            t.elapsed()
        );
        assert!(rel <= 1e-5, "{tag}: {got} vs {want}");
        // Symmetric in its arguments, zero against itself.
        let back = frechet_distance(&s2, &s1).unwrap();
        assert!((back - got).abs() / got <= 1e-9);
        let zero = frechet_distance(&s1, &s1).unwrap();
        assert!(zero.abs() <= 1e-8 * got, "self-distance {zero}");
    }
}

#[test]
fn frechet_distance_of_singular_covariances_matches_pytorch_fid() {
    // Fewer samples than dimensions, so covariances are singular: statistics and distance
    // from the features, against pytorch-fid (scipy's sqrtm copes with these; so must we).
    let r = reference();
    let arrays = npz::read_npz(&fixtures().join("singular.npz")).unwrap();
    let stats = |k: &str| {
        let a = &arrays[k];
        let f: Vec<f32> = a.data.iter().map(|&v| v as f32).collect();
        ActivationStats::from_features(&f, a.shape[1]).unwrap()
    };
    for (a, b) in [("x1", "x2"), ("x2", "x1"), ("x1", "x3")] {
        let want = r[format!("fid_{a}_{b}")].as_f64().unwrap();
        let got = frechet_distance(&stats(a), &stats(b)).unwrap();
        let rel = (got - want).abs() / want;
        eprintln!("FID {a} vs {b} (d 64): {got} vs pytorch-fid {want}: rel error {rel:.2e}");
        assert!(rel <= 1e-5, "{a} {b}: {got} vs {want}");
    }
}

#[test]
fn frechet_distance_of_one_dimensional_gaussians() {
    // N(0, 1) vs N(1, 4): 1 + 1 + 4 - 2 sqrt(4) = 2.
    let a = ActivationStats {
        mu: vec![0.0],
        sigma: vec![1.0],
    };
    let b = ActivationStats {
        mu: vec![1.0],
        sigma: vec![4.0],
    };
    assert!((frechet_distance(&a, &b).unwrap() - 2.0).abs() < 1e-12);
    // Singular covariances (the Cholesky fallback): diag(1, 0) vs diag(4, 0), equal means.
    let a = ActivationStats {
        mu: vec![0.0, 0.0],
        sigma: vec![1.0, 0.0, 0.0, 0.0],
    };
    let b = ActivationStats {
        mu: vec![0.0, 0.0],
        sigma: vec![4.0, 0.0, 0.0, 0.0],
    };
    assert!((frechet_distance(&a, &b).unwrap() - 1.0).abs() < 1e-12);
    // One singular, one definite, either order: 0 + 1 + 5 - 2 sqrt(4) = 2.
    let c = ActivationStats {
        mu: vec![0.0, 0.0],
        sigma: vec![4.0, 0.0, 0.0, 1.0],
    };
    assert!((frechet_distance(&a, &c).unwrap() - 2.0).abs() < 1e-12);
    assert!((frechet_distance(&c, &a).unwrap() - 2.0).abs() < 1e-12);
}

#[test]
fn stats_match_mean_and_np_cov() {
    let arrays = npz::read_npz(&fixtures().join("act.npz")).unwrap();
    let act: Vec<f32> = arrays["act"].data.iter().map(|&v| v as f32).collect();
    assert_eq!(arrays["act"].shape, vec![10, 8]);
    let s = ActivationStats::from_features(&act, 8).unwrap();
    let mu_err = max_rel(&s.mu, &arrays["mu"].data);
    let sigma_err = max_rel(&s.sigma, &arrays["sigma"].data);
    eprintln!(
        "stats: mu rel error {mu_err:.2e}, sigma rel error {sigma_err:.2e} (tolerance 1e-12)"
    );
    assert!(mu_err <= 1e-12 && sigma_err <= 1e-12);
}

#[test]
fn npz_reads_numpy_files() {
    let a = npz::read_stats(&fixtures().join("a1.npz")).unwrap();
    assert_eq!(a.dim(), 16);
    assert_eq!(a.sigma.len(), 256);
    for i in 0..16 {
        for j in 0..16 {
            assert_eq!(a.sigma[i * 16 + j], a.sigma[j * 16 + i]);
        }
    }
    // np.savez (stored, not deflated), float32: the same values rounded to f32.
    let f = npz::read_stats(&fixtures().join("a1_f32_plain.npz")).unwrap();
    for (x, y) in f.mu.iter().chain(&f.sigma).zip(a.mu.iter().chain(&a.sigma)) {
        assert_eq!(*x, *y as f32 as f64);
    }
}

#[test]
fn npz_write_read_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let a = npz::read_stats(&fixtures().join("b1.npz")).unwrap();
    let out = dir.path().join("sub/stats.npz");
    npz::write_stats(&out, &a).unwrap();
    assert_eq!(npz::read_stats(&out).unwrap(), a);
    // The layout np.load expects: deflated `mu.npy` and `sigma.npy` entries.
    let mut z = zip::ZipArchive::new(std::fs::File::open(&out).unwrap()).unwrap();
    let mut names: Vec<String> = z.file_names().map(str::to_string).collect();
    names.sort();
    assert_eq!(names, ["mu.npy", "sigma.npy"]);
    assert_eq!(
        z.by_name("sigma.npy").unwrap().compression(),
        zip::CompressionMethod::Deflated
    );
    // No temp file is left beside it.
    assert_eq!(
        std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
        1
    );
    // For checking by hand that numpy / pytorch-fid read it:
    // DECORR_NPZ_OUT=/tmp/b1_rust.npz cargo test -p decorr-eval --test fid npz_write
    // then np.load('/tmp/b1_rust.npz') in Python.
    if let Some(p) = std::env::var_os("DECORR_NPZ_OUT") {
        npz::write_stats(Path::new(&p), &a).unwrap();
    }
}

#[test]
fn pth_values_equal_the_generated_weights() {
    let shapes = weight_shapes();
    for file in ["partial.pth", "partial_legacy.pth"] {
        let path = fixtures().join(file);
        // pytorch-fid's real weight file is in the legacy format, like partial_legacy.pth;
        // read_state_dict tells it from the zip format by its first bytes.
        let sd = decorr_convert::read_state_dict(&path).unwrap();
        let mut checked = 0;
        for (k, (name, shape)) in shapes.iter().enumerate() {
            let Some(t) = sd.get(name) else { continue };
            assert_eq!(&t.shape, shape, "{name}");
            assert_eq!(
                t,
                &host(shape, &synthetic_weight(k, name, shape)),
                "{file}: {name}"
            );
            checked += 1;
        }
        assert_eq!(checked, 10, "{file}");
        // Loading the partial file names what is missing.
        let e = load_inception(&path, &decorr_core::device_from_env())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`Conv2d_2a_3x3.conv.weight` is missing") && e.contains(file),
            "{e}"
        );
        assert!(!e.contains("`Conv2d_1a_3x3.conv.weight`"), "{e}");
    }
}

#[test]
fn loading_reports_bad_tensors_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut sd = synthetic_state_dict();
    sd.remove("Mixed_6c.branch7x7dbl_4.bn.running_var");
    sd.insert(
        "Mixed_7c.branch_pool.conv.weight".into(),
        host(&[192, 2048, 3, 3], &vec![0.0; 192 * 2048 * 9]),
    );
    sd.insert("extra.weight".into(), host(&[2], &[1.0, 2.0]));
    // Ignored like pytorch-fid's unused head and buffers.
    sd.insert("fc.weight".into(), host(&[1008, 2], &vec![0.0; 2016]));
    sd.insert("AuxLogits.fc.bias".into(), host(&[1], &[0.0]));
    sd.insert(
        "Mixed_5b.branch1x1.bn.num_batches_tracked".into(),
        HostTensor {
            dtype: DType::I64,
            shape: vec![],
            data: 0i64.to_le_bytes().to_vec(),
        },
    );
    let path = dir.path().join("w.safetensors");
    decorr_convert::tensor::write_safetensors(&path, &sd).unwrap();
    let e = load_inception(&path, &decorr_core::device_from_env())
        .unwrap_err()
        .to_string();
    eprintln!("{e}");
    assert!(
        e.contains("`Mixed_6c.branch7x7dbl_4.bn.running_var` is missing"),
        "{e}"
    );
    assert!(
        e.contains("`Mixed_7c.branch_pool.conv.weight` has shape [192, 2048, 3, 3]")
            && e.contains("[192, 2048, 1, 1]"),
        "{e}"
    );
    assert!(e.contains("`extra.weight`"), "{e}");
    assert!(!e.contains("fc.weight") && !e.contains("AuxLogits") && !e.contains("num_batches"));

    // torchvision's ImageNet Inception has the same names but a 1000-class head.
    let mut sd = synthetic_state_dict();
    sd.insert("fc.weight".into(), host(&[1000, 1], &vec![0.0; 1000]));
    decorr_convert::tensor::write_safetensors(&path, &sd).unwrap();
    let e = load_inception(&path, &decorr_core::device_from_env())
        .unwrap_err()
        .to_string();
    assert!(e.contains("torchvision's ImageNet"), "{e}");

    let e = load_inception(
        &dir.path().join("nope.pth"),
        &decorr_core::device_from_env(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("pt_inception-2015-12-05-6726825d.pth"), "{e}");
}

fn write_png(path: &Path, w: u32, h: u32, seed: u8) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x as u8).wrapping_mul(3).wrapping_add(seed),
            (y as u8).wrapping_mul(5),
            seed.wrapping_mul(7) ^ (x as u8).wrapping_add(y as u8),
        ])
    });
    img.save(path).unwrap();
}

#[test]
fn folder_errors_name_the_problem() {
    let device = decorr_core::device_from_env();
    let model = synthetic_model(&device);
    let dir = tempfile::tempdir().unwrap();
    // No images (other files and upper-case extensions do not count, as in pytorch-fid).
    std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
    write_png(&dir.path().join("UPPER.PNG"), 8, 8, 1);
    let e = folder_stats(&model, dir.path(), 50, &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("holds no images") && e.contains(".png"), "{e}");
    // One image: covariance undefined.
    write_png(&dir.path().join("b.png"), 64, 48, 1);
    let e = folder_stats(&model, dir.path(), 50, &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 2"), "{e}");
    // Mixed sizes: both files and sizes named, before any network work.
    write_png(&dir.path().join("a.png"), 32, 32, 2);
    let e = folder_stats(&model, dir.path(), 50, &device)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("a.png") && e.contains("32x32") && e.contains("b.png") && e.contains("64x48"),
        "{e}"
    );
    // Undecodable file with an image extension.
    std::fs::remove_file(dir.path().join("a.png")).unwrap();
    std::fs::write(dir.path().join("c.png"), b"not a png").unwrap();
    let e = folder_stats(&model, dir.path(), 50, &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("c.png"), "{e}");
    // Not a folder.
    let e = folder_stats(&model, &dir.path().join("missing"), 50, &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing") && e.contains("not a folder"), "{e}");
}

#[test]
fn stats_errors() {
    let a = ActivationStats {
        mu: vec![0.0; 2],
        sigma: vec![1.0, 0.0, 0.0, 1.0],
    };
    let b = ActivationStats {
        mu: vec![0.0; 3],
        sigma: vec![0.0; 9],
    };
    let e = frechet_distance(&a, &b).unwrap_err().to_string();
    assert!(
        e.contains("different dimensions") && e.contains('2') && e.contains('3'),
        "{e}"
    );
    let nan = ActivationStats {
        mu: vec![f64::NAN, 0.0],
        sigma: a.sigma.clone(),
    };
    assert!(
        frechet_distance(&a, &nan)
            .unwrap_err()
            .to_string()
            .contains("NaN")
    );
    let e = ActivationStats::from_features(&[1.0; 8], 8)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 2"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    // An npz without sigma.
    let p = dir.path().join("mu_only.npz");
    npz::write_npz(&p, &[("mu", &npz::NpyArray::new(vec![2], vec![0.0, 1.0]))]).unwrap();
    let e = npz::read_stats(&p).unwrap_err().to_string();
    assert!(e.contains("`sigma`") && e.contains("mu_only.npz"), "{e}");
    // sigma of the wrong shape.
    let p = dir.path().join("bad_shape.npz");
    let mu = npz::NpyArray::new(vec![2], vec![0.0, 1.0]);
    let sigma = npz::NpyArray::new(vec![3, 3], vec![0.0; 9]);
    npz::write_npz(&p, &[("mu", &mu), ("sigma", &sigma)]).unwrap();
    let e = npz::read_stats(&p).unwrap_err().to_string();
    assert!(e.contains("[3, 3]") && e.contains("(2, 2)"), "{e}");
    // Not a zip.
    let p = dir.path().join("junk.npz");
    std::fs::write(&p, b"junk").unwrap();
    let e = npz::read_stats(&p).unwrap_err().to_string();
    assert!(e.contains("junk.npz") && e.contains("zip"), "{e}");
}

/// End to end on SD-sized images with the synthetic network, for timing notes:
/// `cargo test -p decorr-eval --test fid -- --ignored --nocapture`.
#[test]
#[ignore]
fn pipeline_timing_on_real_size_images() {
    let device = decorr_core::device_from_env();
    let model = synthetic_model(&device);
    let dir = tempfile::tempdir().unwrap();
    let n = 4;
    for i in 0..n {
        write_png(&dir.path().join(format!("{i}.png")), 512, 512, i as u8 * 40);
    }
    let t = Instant::now();
    let stats = folder_stats(&model, dir.path(), n, &device).unwrap();
    let per = t.elapsed().as_secs_f64() / n as f64;
    eprintln!("{n} images 512x512: {:.2} s per image (batch {n})", per);
    let other = folder_stats(&model, dir.path(), 1, &device).unwrap();
    let fid_self = frechet_distance(&stats, &other).unwrap();
    eprintln!("self FID with batch 4 vs 1: {fid_self:e}");
    // 2048-d Fréchet distance timing (real use): stats of random features, positive definite
    // (more samples than dimensions) and singular (fewer).
    // Any pseudo-random numbers do: the stand-in weight formula of a conv tensor.
    let feats = synthetic_weight(0, "x.conv.weight", &[8200 * FEATURE_DIM, 6]);
    let rows = |a: usize, b: usize| &feats[a * FEATURE_DIM..b * FEATURE_DIM];
    let t = Instant::now();
    let pd1 = ActivationStats::from_features(rows(0, 2500), FEATURE_DIM).unwrap();
    eprintln!("stats of 2500 x 2048 features: {:?}", t.elapsed());
    let pd2 = ActivationStats::from_features(rows(2500, 5000), FEATURE_DIM).unwrap();
    let sg1 = ActivationStats::from_features(rows(5000, 6500), FEATURE_DIM).unwrap();
    let sg2 = ActivationStats::from_features(rows(6500, 8000), FEATURE_DIM).unwrap();
    for (what, a, b) in [
        ("definite vs definite", &pd1, &pd2),
        ("singular vs definite", &sg1, &pd2),
        ("singular vs singular", &sg1, &sg2),
    ] {
        let t = Instant::now();
        let d = frechet_distance(a, b).unwrap();
        eprintln!("frechet_distance d=2048, {what}: {d} in {:?}", t.elapsed());
    }
    let _ = fid::DEFAULT_BATCH_SIZE;
}

/// The full-size legacy-format path, as pytorch-fid's real weight file takes it: the synthetic
/// weights saved by `torch.save(fid_inception_v3().state_dict(), PATH,
/// _use_new_zipfile_serialization=False)` with the fixture script's patched loader (95.6 MB, not
/// committed); `DECORR_FID_SYNTHETIC_PTH=PATH cargo test -p decorr-eval --test fid -- --ignored`.
#[test]
#[ignore]
fn full_legacy_weight_file_gives_reference_features() {
    let Some(path) = std::env::var_os("DECORR_FID_SYNTHETIC_PTH") else {
        eprintln!("DECORR_FID_SYNTHETIC_PTH is not set; skipped");
        return;
    };
    let device = decorr_core::device_from_env();
    let t = Instant::now();
    let model = load_inception(Path::new(&path), &device).unwrap();
    eprintln!("loaded {} in {:?}", Path::new(&path).display(), t.elapsed());
    let files = list_images(&fixtures().join("small")).unwrap();
    let got = features_of_files(&model, &files, 4, &device).unwrap();
    let (_, want) = read_f32(&fixtures().join("features.safetensors"), "features");
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("features from the legacy file: max abs error {err:.3e}");
    assert!(err <= 1e-4);
}

/// PIL's `.convert('RGB')` of grey, grey+alpha, palette and RGBA PNGs, exactly.
#[test]
fn png_colour_types_convert_like_pil() {
    let dir = fixtures().join("modes");
    for mode in ["L", "LA", "P", "RGBA"] {
        let ours = fid::read_image(&dir.join(format!("{mode}.png"))).unwrap();
        let pil = fid::read_image(&dir.join(format!("{mode}_rgb.png"))).unwrap();
        assert_eq!((ours.width, ours.height), (16, 16));
        assert_eq!(ours.data, pil.data, "{mode}");
    }
}

/// JPEG is decoded by the image crate (zune-jpeg), pytorch-fid's by PIL (libjpeg-turbo): not
/// bit-identical, so this bounds the difference on 4:2:0 and 4:4:4 files.
#[test]
fn jpeg_decoding_is_close_to_pil() {
    let dir = fixtures().join("jpeg");
    let mut worst = 0f32;
    let mut mean_sum = 0f64;
    let mut count = 0usize;
    for name in ["s2_circle", "s3_stripes"] {
        for q in [90, 75] {
            let ours = fid::read_image(&dir.join(format!("{name}_q{q}.jpg"))).unwrap();
            let pil = fid::read_image(&dir.join(format!("{name}_q{q}_pil.png"))).unwrap();
            assert_eq!((ours.width, ours.height), (pil.width, pil.height));
            for (a, b) in ours.data.iter().zip(&pil.data) {
                let d = (a - b).abs() * 255.0;
                worst = worst.max(d);
                mean_sum += d as f64;
                count += 1;
            }
        }
    }
    let mean = mean_sum / count as f64;
    eprintln!("JPEG vs PIL: max {worst:.0}/255, mean {mean:.3}/255 per channel value");
    assert!(worst <= 4.0 && mean <= 0.3, "max {worst}, mean {mean}");
}
