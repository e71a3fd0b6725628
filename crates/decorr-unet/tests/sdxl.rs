//! SDXL parity with diffusers 0.42 on the tiny random SDXL model (tests/fixtures/sdxl_tiny; the
//! references in tests/fixtures/sdxl_unet by tests/pyref/make_sdxl_unet_fixtures.py): the
//! `text_time` UNet's prediction for a batch of two (two timesteps, two rows of time ids) within
//! 1e-4 max abs error and its attention maps within 1e-5 (f32; the maps are probabilities, so
//! the tighter bound), the time ids' sinusoids within 1e-6, the VAE's decode within 1e-4; the
//! SDXL presets' parameter counts equal diffusers'; the attention sites PAG and
//! Attend-and-Excite pick by name; and the errors for added conditions that do not fit the UNet.
//! A full-size SDXL UNet pass (random weights, its peak memory) runs with `--ignored`.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use decorr_core::ModelSource;
use decorr_core::weights::{HostTensors as Tensors, read_tensors_f32};
use decorr_unet::{
    AddedConditions, AttentionOptions, Capture, UNet2DConditionModel, UNetConfig, UNetError,
    VaeConfig, load_unet, load_vae,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn refs() -> Tensors {
    read_tensors_f32(&fixtures().join("sdxl_unet/reference.safetensors")).unwrap()
}

fn cases() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("sdxl_unet/cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
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

fn tiny_unet(device: &Device) -> UNet2DConditionModel {
    load_unet(&ModelSource::Local(fixtures().join("sdxl_tiny")), device)
        .unwrap()
        .model
}

/// The fixture's inputs: sample, timesteps, context and the added conditions.
fn inputs(refs: &Tensors, device: &Device) -> (Tensor<4>, Vec<f64>, Tensor<3>, AddedConditions) {
    let ts: Vec<f64> = serde_json::from_value(cases()["timesteps"].clone()).unwrap();
    let added = AddedConditions {
        text_embeds: tensor(refs, "b2.text_embeds", device),
        time_ids: tensor(refs, "b2.time_ids", device),
    };
    (
        tensor(refs, "b2.sample", device),
        ts,
        tensor(refs, "b2.context", device),
        added,
    )
}

#[test]
fn text_time_unet_matches_diffusers() {
    let device = decorr_core::device_from_env();
    let unet = tiny_unet(&device);
    let refs = refs();
    let cases = cases();
    let (x, ts, ctx, added) = inputs(&refs, &device);
    let self_module = cases["self_module"].as_str().unwrap().to_string();
    let opts = AttentionOptions {
        capture_cross: Capture::All,
        capture_self: Capture::Prefixes(vec![self_module.clone()]),
        ..Default::default()
    };
    let out = unet
        .forward_added(x.clone(), &ts, &ctx, Some(&added), &opts)
        .unwrap();
    let d = max_diff(out.sample, &refs, "b2.out");
    println!("sdxl tiny UNet b2: output max abs err {d:.2e}");
    assert!(d <= 1e-4, "output differs by {d}");

    // Without captures every attention takes the backend's fused kernel.
    let plain = unet
        .forward_added(x, &ts, &ctx, Some(&added), &AttentionOptions::default())
        .unwrap();
    let d = max_diff(plain.sample, &refs, "b2.out");
    println!("sdxl tiny UNet b2, fused attention: output max abs err {d:.2e}");
    assert!(d <= 1e-4, "fused-attention output differs by {d}");

    let want: Vec<String> = serde_json::from_value(cases["cross_modules"].clone()).unwrap();
    let mut ours: Vec<String> = out
        .cross_attention
        .iter()
        .map(|m| m.module.clone())
        .collect();
    ours.sort();
    assert_eq!(ours, want, "captured modules");
    let mut worst = 0.0f32;
    for m in &out.cross_attention {
        worst = worst.max(max_diff(
            m.probs.clone(),
            &refs,
            &format!("b2.cross.{}", m.module),
        ));
    }
    assert_eq!(out.self_attention.len(), 1);
    assert_eq!(out.self_attention[0].module, self_module);
    worst = worst.max(max_diff(
        out.self_attention[0].probs.clone(),
        &refs,
        &format!("b2.self.{self_module}"),
    ));
    println!("sdxl tiny UNet b2: attention maps max abs err {worst:.2e}");
    assert!(worst <= 1e-5, "attention maps differ by {worst}");
}

/// The time ids' sinusoids (`add_time_proj`: f32, cos first, shift 0 as the config says) and
/// the added embedding, each alone, so a difference in the prediction can be placed.
#[test]
fn time_id_sinusoids_and_added_embedding_match_diffusers() {
    let device = decorr_core::device_from_env();
    let unet = tiny_unet(&device);
    let refs = refs();
    let ids: Vec<f64> = refs["b2.time_ids"].1.iter().map(|&v| v as f64).collect();
    let dims = unet.text_time_dims().expect("a text_time UNet");
    assert_eq!(
        (dims.time_embed_dim, dims.input_dim),
        (8, 68),
        "sdxl_tiny's widths"
    );
    let ours =
        decorr_unet::blocks::timestep_features(&ids, dims.time_embed_dim, true, 0.0, &device);
    let d = max_diff(ours.clone(), &refs, "b2.time_proj");
    println!("time id sinusoids: max abs err {d:.2e}");
    assert!(d <= 1e-6, "sinusoids differ by {d}");
    let input = Tensor::cat(
        vec![
            tensor::<2>(&refs, "b2.text_embeds", &device),
            ours.reshape([2, 6 * dims.time_embed_dim]),
        ],
        1,
    );
    let aug = unet.add_embedding.as_ref().unwrap().forward(input);
    let d = max_diff(aug, &refs, "b2.aug_emb");
    assert!(d <= 1e-5, "added embedding differs by {d}");
}

#[test]
fn sdxl_vae_config_loads_and_decode_matches_diffusers() {
    let device = decorr_core::device_from_env();
    let vae = load_vae(&ModelSource::Local(fixtures().join("sdxl_tiny")), &device).unwrap();
    assert!((vae.config.scaling_factor - 0.13025).abs() < 1e-12);
    assert!(vae.config.force_upcast);
    let refs = refs();
    let img = vae
        .model
        .decode(tensor(&refs, "decode.latent", &device), None);
    let d = max_diff(img, &refs, "decode.image");
    println!("sdxl tiny VAE decode: max abs err {d:.2e}");
    assert!(d <= 1e-4, "decode differs by {d}");
}

/// Parameter counts: the presets' equal diffusers' models built from SDXL base's configs (on
/// the meta device, by the fixture script), and the tiny UNet's estimate equals both diffusers'
/// and the model built here.
#[test]
fn sdxl_presets_count_diffusers_parameters() {
    let cases = cases();
    let sdxl = UNetConfig::preset("sdxl").unwrap();
    sdxl.validate().unwrap();
    assert_eq!(sdxl.num_params(), 2_567_463_684);
    assert_eq!(
        sdxl.num_params(),
        cases["sdxl_unet_params"].as_u64().unwrap() as u128
    );
    let dims = sdxl.text_time_dims().unwrap();
    assert_eq!((dims.time_embed_dim, dims.input_dim), (256, 2816));
    let vae = VaeConfig::sdxl();
    vae.validate().unwrap();
    assert_eq!(
        vae.num_params(),
        cases["sdxl_vae_params"].as_u64().unwrap() as u128
    );

    let text = std::fs::read_to_string(fixtures().join("sdxl_tiny/unet/config.json")).unwrap();
    let tiny: UNetConfig = serde_json::from_str(&text).unwrap();
    tiny.validate().unwrap();
    let built = UNet2DConditionModel::new(&tiny, &Device::flex());
    assert_eq!(tiny.num_params(), built.num_params() as u128);
    assert_eq!(
        tiny.num_params(),
        cases["tiny_unet_params"].as_u64().unwrap() as u128
    );
}

/// PAG on SDXL perturbs the mid block's self-attention: its `attn1` modules are named as
/// diffusers names them, and perturbing them changes only the rows from `perturb_from` on.
/// Attend-and-Excite's stopped pass records the full pass's maps, and under autodiff gives a
/// gradient with respect to the latent.
#[test]
fn attention_sites_and_guidance_hooks_on_sdxl() {
    let device = decorr_core::device_from_env();
    let unet = tiny_unet(&device);
    let sites = unet.attention_sites([8, 8]);
    let mid_self: Vec<(&str, usize)> = sites
        .iter()
        .filter(|s| !s.cross && s.path.starts_with("mid_block"))
        .map(|s| (s.path.as_str(), s.height))
        .collect();
    assert_eq!(
        mid_self,
        [
            ("mid_block.attentions.0.transformer_blocks.0.attn1", 2),
            ("mid_block.attentions.0.transformer_blocks.1.attn1", 2)
        ]
    );
    assert!(
        !sites.iter().any(|s| s.path.starts_with("down_blocks.0")),
        "the first level (DownBlock2D) has no attention"
    );
    let mut cross: Vec<String> = sites
        .iter()
        .filter(|s| s.cross)
        .map(|s| s.path.clone())
        .collect();
    cross.sort();
    let want: Vec<String> = serde_json::from_value(cases()["cross_modules"].clone()).unwrap();
    assert_eq!(cross, want);

    let refs = refs();
    let (x, ts, ctx, added) = inputs(&refs, &device);
    let plain = unet
        .forward_added(
            x.clone(),
            &ts,
            &ctx,
            Some(&added),
            &AttentionOptions::default(),
        )
        .unwrap()
        .sample;
    let pag = unet
        .forward_added(
            x.clone(),
            &ts,
            &ctx,
            Some(&added),
            &AttentionOptions {
                perturb_self: Capture::Prefixes(vec!["mid_block".into()]),
                perturb_from: 1,
                ..Default::default()
            },
        )
        .unwrap()
        .sample;
    let row = |t: &Tensor<4>, i: usize| t.clone().narrow(0, i, 1);
    let same = (row(&plain, 0) - row(&pag, 0))
        .abs()
        .max()
        .into_scalar::<f32>();
    let moved = (row(&plain, 1) - row(&pag, 1))
        .abs()
        .max()
        .into_scalar::<f32>();
    assert_eq!(same, 0.0, "row 0 keeps its attention");
    assert!(moved > 1e-4, "row 1 is perturbed: {moved}");

    let opts = AttentionOptions {
        capture_cross: Capture::All,
        ..Default::default()
    };
    let full = unet
        .forward_added(x.clone(), &ts, &ctx, Some(&added), &opts)
        .unwrap();
    let last = "mid_block.attentions.0.transformer_blocks.1.attn2";
    let part = unet
        .cross_attention_until_added(x.clone(), &ts, &ctx, Some(&added), &opts, last)
        .unwrap();
    assert_eq!(part.last().unwrap().module, last);
    for (a, b) in part.iter().zip(&full.cross_attention) {
        assert_eq!(a.module, b.module);
        let d = (a.probs.clone() - b.probs.clone())
            .abs()
            .max()
            .into_scalar::<f32>();
        assert_eq!(d, 0.0, "{}", a.module);
    }

    // Under autodiff (the host kernels' backward with the weights stored split per tap).
    let leaf = x.autodiff().require_grad();
    let maps = unet
        .cross_attention_until_added(leaf.clone(), &ts, &ctx, Some(&added), &opts, last)
        .unwrap();
    let score = maps
        .into_iter()
        .map(|m| m.probs.narrow(2, 1, 1).sum())
        .reduce(|a, b| a + b)
        .unwrap();
    let grads = score.backward();
    let g = leaf.grad(&grads).expect("a gradient").inner();
    let norm = g.abs().sum().into_scalar::<f32>();
    assert!(norm.is_finite() && norm > 0.0, "gradient norm {norm}");
}

#[test]
fn added_conditions_that_do_not_fit_are_errors() {
    let device = decorr_core::device_from_env();
    let unet = tiny_unet(&device);
    let refs = refs();
    let (x, ts, ctx, added) = inputs(&refs, &device);
    let opts = AttentionOptions::default();
    let err = |r: Result<decorr_unet::UNetOutput, UNetError>| match r {
        Ok(_) => panic!("the pass must be refused"),
        Err(e @ UNetError::Input(_)) => e.to_string(),
        Err(e) => panic!("not an input error: {e}"),
    };

    let e = err(unet.forward_added(x.clone(), &ts, &ctx, None, &opts));
    assert!(
        e.contains("text_time") && e.contains("AddedConditions") && e.contains("forward_added"),
        "{e}"
    );
    let e = unet
        .cross_attention_until_added(x.clone(), &ts, &ctx, None, &opts, "mid_block")
        .unwrap_err()
        .to_string();
    assert!(e.contains("text_time"), "{e}");

    // A pooled embedding of the wrong width.
    let narrow = AddedConditions {
        text_embeds: added.text_embeds.clone().narrow(1, 0, 16),
        ..added.clone()
    };
    let e = err(unet.forward_added(x.clone(), &ts, &ctx, Some(&narrow), &opts));
    assert!(
        e.contains("[2, 16]") && e.contains("68") && e.contains("projection_class_embeddings"),
        "{e}"
    );
    // One row of conditions for a batch of two.
    let one = AddedConditions {
        text_embeds: added.text_embeds.clone().narrow(0, 0, 1),
        time_ids: added.time_ids.clone().narrow(0, 0, 1),
    };
    let e = err(unet.forward_added(x.clone(), &ts, &ctx, Some(&one), &opts));
    assert!(e.contains("batch of 2"), "{e}");

    // SD 1.x's UNet takes none.
    let sd1 = load_unet(&ModelSource::Local(fixtures().join("unet_tiny_a")), &device)
        .unwrap()
        .model;
    assert!(sd1.text_time_dims().is_none());
    let ctx16 = Tensor::<3>::zeros([2, 77, 16], &device);
    let e = err(sd1.forward_added(x, &ts, &ctx16, Some(&added), &opts));
    assert!(
        e.contains("addition_embed_type") && e.contains("None"),
        "{e}"
    );
}

/// The SD 1.x entry points refuse a `text_time` UNet by panicking with the same message: they
/// have no way to pass the conditions, and an SDXL pass without them would be wrong silently.
#[test]
#[should_panic(expected = "forward_added")]
fn old_entry_points_panic_on_a_text_time_unet() {
    let device = decorr_core::device_from_env();
    let unet = tiny_unet(&device);
    let refs = refs();
    let (x, ts, ctx, _) = inputs(&refs, &device);
    let _ = unet.forward(x, &ts, &ctx);
}

#[test]
fn addition_config_errors_name_the_key() {
    let base = UNetConfig::sdxl();
    let e = UNetConfig {
        addition_embed_type: Some("text".into()),
        ..base.clone()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("addition_embed_type") && e.contains("\"text\"") && e.contains("text_time"),
        "{e}"
    );
    let e = UNetConfig {
        addition_time_embed_dim: None,
        ..base.clone()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("addition_time_embed_dim") && e.contains("missing"),
        "{e}"
    );
    let e = UNetConfig {
        projection_class_embeddings_input_dim: Some(0),
        ..base.clone()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("projection_class_embeddings_input_dim"), "{e}");
    let mut extra = base;
    extra
        .extra
        .insert("time_embedding_act_fn".into(), "silu".into());
    let e = extra.validate().unwrap_err().to_string();
    assert!(e.contains("time_embedding_act_fn"), "{e}");
}

/// Loading stores the 3x3 convolution weights split per tap (one copy; see
/// `decorr_unet::host::store_taps`): a view, not a contiguous tensor, whose values are the
/// file's.
#[test]
fn loaded_convolution_weights_are_stored_split_per_tap() {
    if !decorr_unet::host::enabled() {
        return; // DECORR_HOST_KERNELS=0: burn's convolutions, weights as loaded.
    }
    let device = Device::flex();
    let unet = tiny_unet(&device);
    let stored = unet.down_blocks[0].resnets[0].conv1.weight.val();
    let flex = stored
        .clone()
        .try_into_primitive::<burn::backend::Flex>()
        .ok()
        .unwrap();
    assert!(!flex.is_contiguous(), "stored split per tap");
    let file =
        read_tensors_f32(&fixtures().join("sdxl_tiny/unet/diffusion_pytorch_model.safetensors"))
            .unwrap();
    let (shape, values) = &file["down_blocks.0.resnets.0.conv1.weight"];
    assert_eq!(&stored.dims().to_vec(), shape);
    let ours = stored.into_data().try_into_vec::<f32>().unwrap();
    assert_eq!(&ours, values);
}

/// Full-size SDXL base UNet with random weights: one batch-1 pass at 64x64 latents (512 px)
/// with the weights stored as loading stores them, reporting the time and the process's peak
/// RSS: `cargo test --release -p decorr-unet --test sdxl -- --ignored --nocapture` (10.3 GB
/// of f32 weights; set DECORR_SDXL_CACHED_TAPS=1 to leave them contiguous, as before, and see
/// the host path's split copies come on top).
#[test]
#[ignore = "builds the 2.6 B-parameter SDXL UNet (10.3 GB) and runs it on the CPU"]
fn full_size_sdxl_forward_memory() {
    let device = decorr_core::device_from_env();
    let rss = || {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .map_or(f64::NAN, |kb| kb / 1e6)
        };
        (field("VmRSS:"), field("VmHWM:"))
    };
    let t = std::time::Instant::now();
    let config = UNetConfig::sdxl();
    let mut unet = UNet2DConditionModel::new(&config, &device);
    // Materialise the lazily initialised weights, as loading would.
    unet = unet.map(&mut Materialise);
    let (now, peak) = rss();
    println!(
        "built: {:.1} s, RSS {now:.2} GB, peak {peak:.2} GB",
        t.elapsed().as_secs_f64()
    );
    if std::env::var("DECORR_SDXL_CACHED_TAPS").is_err() {
        unet.store_conv_taps([64, 64]);
        let (now, peak) = rss();
        println!("weights stored split per tap: RSS {now:.2} GB, peak {peak:.2} GB");
    }
    device.seed(0);
    let normal = burn::tensor::Distribution::Normal(0.0, 1.0);
    let x = Tensor::<4>::random([1, 4, 64, 64], normal, &device);
    let ctx = Tensor::<3>::random([1, 77, 2048], normal, &device);
    let added = AddedConditions {
        text_embeds: Tensor::random([1, 1280], normal, &device),
        time_ids: Tensor::from_data(
            TensorData::new(vec![512f32, 512.0, 0.0, 0.0, 512.0, 512.0], [1, 6]),
            &device,
        ),
    };
    for pass in 0..2 {
        let t = std::time::Instant::now();
        let y = unet
            .forward_added(
                x.clone(),
                &[981.0],
                &ctx,
                Some(&added),
                &AttentionOptions::default(),
            )
            .unwrap()
            .sample;
        let finite = y.into_data().iter::<f32>().all(f32::is_finite);
        let (now, peak) = rss();
        println!(
            "pass {pass}: {:.1} s, finite {finite}, RSS {now:.2} GB, peak {peak:.2} GB",
            t.elapsed().as_secs_f64()
        );
        assert!(finite);
    }
}

/// Forces every lazily initialised parameter to be allocated.
struct Materialise;

impl burn::module::ModuleMapper for Materialise {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<Tensor<D>>,
    ) -> burn::module::Param<Tensor<D>> {
        let _ = param.val();
        param
    }
}
