//! Parity with diffusers 0.42 (fixtures by tests/pyref/make_unet_fixtures.py): UNet outputs for
//! several batch sizes, sizes (one odd) and timesteps, captured cross- and self-attention maps,
//! VAE encode and decode, within 1e-4 max abs error in f32; fp16 variant files and old VAE
//! attention names load. A full-size SD 1.5 check runs with `--ignored` and DECORR_FULL_SD15.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use decorr_core::ModelSource;
use decorr_core::weights::{HostTensors as Tensors, read_tensors_f32};
use decorr_unet::{AttentionOptions, Capture, load_unet, load_vae};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tensor<const D: usize>(refs: &Tensors, key: &str, device: &Device) -> Tensor<D> {
    let (shape, values) = refs
        .get(key)
        .unwrap_or_else(|| panic!("fixture lacks {key}"));
    let shape: [usize; D] = shape.clone().try_into().expect("rank");
    Tensor::from_data(TensorData::new(values.clone(), shape), device)
}

/// Max abs difference, after checking shapes agree.
fn max_diff<const D: usize>(ours: Tensor<D>, refs: &Tensors, key: &str) -> f32 {
    let (shape, theirs) = &refs[key];
    assert_eq!(&ours.dims().to_vec(), shape, "{key}: shape");
    let ours = ours
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap();
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn check_unet(name: &str) {
    let device = decorr_core::device_from_env();
    let dir = fixtures().join(name);
    let unet = load_unet(&ModelSource::Local(dir.clone()), &device).unwrap();
    let refs = read_tensors_f32(&dir.join("reference.safetensors")).unwrap();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    for case in cases["cases"].as_array().unwrap() {
        let c = case["name"].as_str().unwrap();
        let ts: Vec<f64> = serde_json::from_value(case["timesteps"].clone()).unwrap();
        let self_module = case["self_module"].as_str().unwrap().to_string();
        let opts = AttentionOptions {
            slice_size: (c == "b1_16x16").then_some(3), // sliced attention gives the same result
            capture_cross: Capture::All,
            capture_self: Capture::Prefixes(vec![self_module.clone()]),
            ..Default::default()
        };
        let out = unet.model.forward_with(
            tensor(&refs, &format!("{c}.sample"), &device),
            &ts,
            &tensor(&refs, &format!("{c}.context"), &device),
            &opts,
        );
        let d = max_diff(out.sample, &refs, &format!("{c}.out"));
        println!("{name} {c}: output max abs err {d:.2e}");
        assert!(d <= 1e-4, "{name} {c}: output differs by {d}");

        // Without captures every attention takes the backend's fused kernel.
        let plain = unet.model.forward(
            tensor(&refs, &format!("{c}.sample"), &device),
            &ts,
            &tensor(&refs, &format!("{c}.context"), &device),
        );
        let d = max_diff(plain, &refs, &format!("{c}.out"));
        assert!(
            d <= 1e-4,
            "{name} {c}: fused-attention output differs by {d}"
        );

        let modules: Vec<String> = serde_json::from_value(case["cross_modules"].clone()).unwrap();
        let ours: Vec<&str> = out
            .cross_attention
            .iter()
            .map(|m| m.module.as_str())
            .collect();
        let mut sorted = ours.clone();
        sorted.sort();
        assert_eq!(sorted, modules, "{name} {c}: captured modules");
        let mut worst = 0.0f32;
        for m in &out.cross_attention {
            worst = worst.max(max_diff(
                m.probs.clone(),
                &refs,
                &format!("{c}.cross.{}", m.module),
            ));
            let [_, q, _] = m.probs.dims();
            assert_eq!(
                q,
                m.height * m.width,
                "{}: query count is the map's pixels",
                m.module
            );
        }
        assert_eq!(
            out.self_attention.len(),
            1,
            "only the requested self-attention map"
        );
        let s = &out.self_attention[0];
        assert_eq!(s.module, self_module);
        worst = worst.max(max_diff(
            s.probs.clone(),
            &refs,
            &format!("{c}.self.{self_module}"),
        ));
        assert!(
            worst <= 1e-5,
            "{name} {c}: attention maps differ by {worst}"
        );
    }
}

#[test]
fn unet_sd1_like_matches_diffusers() {
    check_unet("unet_tiny_a");
}

#[test]
fn unet_sd2_like_fp16_variant_matches_diffusers() {
    check_unet("unet_tiny_b");
}

fn check_vae(folder: &Path, refs_dir: &Path) {
    let device = decorr_core::device_from_env();
    let vae = load_vae(&ModelSource::Local(folder.to_path_buf()), &device).unwrap();
    assert!((vae.config.scaling_factor - 0.18215).abs() < 1e-12);
    let refs = read_tensors_f32(&refs_dir.join("reference.safetensors")).unwrap();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(refs_dir.join("cases.json")).unwrap())
            .unwrap();
    for case in cases["cases"].as_array().unwrap() {
        let c = case["name"].as_str().unwrap();
        let d = if case["kind"] == "encode" {
            let post = vae
                .model
                .encode(tensor(&refs, &format!("{c}.image"), &device), None);
            max_diff(post.mean, &refs, &format!("{c}.mean")).max(max_diff(
                post.logvar,
                &refs,
                &format!("{c}.logvar"),
            ))
        } else {
            let img = vae
                .model
                .decode(tensor(&refs, &format!("{c}.latent"), &device), Some(1));
            max_diff(img, &refs, &format!("{c}.image"))
        };
        println!("{} {c}: max abs err {d:.2e}", folder.display());
        assert!(d <= 1e-4, "{c}: differs by {d}");
    }
}

#[test]
fn vae_matches_diffusers() {
    let dir = fixtures().join("vae_tiny");
    check_vae(&dir, &dir);
}

#[test]
fn vae_with_old_attention_names_loads() {
    let dir = fixtures().join("vae_tiny");
    check_vae(&dir.join("vae_old_keys"), &dir);
}

/// Full-size SD 1.5 UNet (batch 2, 64x64) and VAE decode with random weights:
/// `python tests/pyref/make_unet_fixtures.py --full DIR` then
/// `DECORR_FULL_SD15=DIR cargo test --release -p decorr-unet --test parity -- --ignored`.
#[test]
#[ignore = "needs DECORR_FULL_SD15 (3.7 GB written by the fixture script)"]
fn full_size_sd15_matches_diffusers() {
    let dir = PathBuf::from(std::env::var("DECORR_FULL_SD15").expect("set DECORR_FULL_SD15=DIR"));
    let device = decorr_core::device_from_env();
    let unet = load_unet(&ModelSource::Local(dir.clone()), &device).unwrap();
    let refs = read_tensors_f32(&dir.join("unet_reference.safetensors")).unwrap();
    let t = std::time::Instant::now();
    let out = unet.model.forward(
        tensor(&refs, "sample", &device),
        &[981.0, 981.0],
        &tensor(&refs, "context", &device),
    );
    let d = max_diff(out, &refs, "out");
    println!(
        "full-size UNet b2 64x64: max abs err {d:.2e} ({:.1} s)",
        t.elapsed().as_secs_f64()
    );
    assert!(d <= 1e-3, "UNet differs by {d}");
    drop(unet);
    let vae = load_vae(&ModelSource::Local(dir.clone()), &device).unwrap();
    let refs = read_tensors_f32(&dir.join("vae_reference.safetensors")).unwrap();
    let img = vae.model.decode(tensor(&refs, "latent", &device), None);
    let d = max_diff(img, &refs, "image");
    println!("full-size VAE decode 64x64: max abs err {d:.2e}");
    assert!(d <= 1e-3, "VAE differs by {d}");
}
