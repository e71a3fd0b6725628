//! Single-file <-> diffusers conversion on the fixtures of tests/pyref/make_convert_fixtures.py:
//! LDM-named files built from the repo's tiny diffusers models (verified there with diffusers'
//! own converter) must convert back to bit-identical tensors.

use std::path::{Path, PathBuf};

use decorr_convert::{
    ConfigChoice, ConvertError, DType, StateDict, ToDiffusers, ToSingleFile,
    convert_diffusers_to_single_file, convert_single_file_to_diffusers, read_state_dict,
    tensor::{read_safetensors, write_safetensors},
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn conv() -> PathBuf {
    fixtures().join("convert")
}

fn tiny_opts() -> ToDiffusers {
    ToDiffusers {
        config: ConfigChoice::Dir(conv().join("diffusers")),
        ..Default::default()
    }
}

fn reference() -> (StateDict, StateDict, StateDict) {
    let f = fixtures();
    (
        read_safetensors(&conv().join("diffusers/text_encoder/model.safetensors")).unwrap(),
        read_safetensors(&f.join("unet_tiny_a/unet/diffusion_pytorch_model.safetensors")).unwrap(),
        read_safetensors(&f.join("vae_tiny/vae/diffusion_pytorch_model.safetensors")).unwrap(),
    )
}

fn outputs(dir: &Path) -> (StateDict, StateDict, StateDict) {
    (
        read_safetensors(&dir.join("text_encoder/model.safetensors")).unwrap(),
        read_safetensors(&dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap(),
        read_safetensors(&dir.join("vae/diffusion_pytorch_model.safetensors")).unwrap(),
    )
}

fn assert_same(what: &str, got: &StateDict, want: &StateDict) {
    let gk: Vec<_> = got.keys().collect();
    let wk: Vec<_> = want.keys().collect();
    assert_eq!(gk, wk, "{what}: tensor names differ");
    for (k, w) in want {
        let g = &got[k];
        assert_eq!(g.dtype, w.dtype, "{what}: `{k}` dtype");
        assert_eq!(g.shape, w.shape, "{what}: `{k}` shape");
        assert!(g.data == w.data, "{what}: `{k}` values differ");
    }
}

fn cast(sd: &StateDict, d: DType) -> StateDict {
    sd.iter()
        .map(|(k, t)| (k.clone(), t.clone().cast(d)))
        .collect()
}

#[test]
fn safetensors_to_diffusers_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let s = convert_single_file_to_diffusers(&conv().join("tiny.safetensors"), &out, &tiny_opts())
        .unwrap();
    assert_eq!((s.text_encoder, s.unet, s.vae), (52, 208, 124));
    let (te, unet, vae) = outputs(&out);
    let (rte, runet, rvae) = reference();
    assert_same("text encoder", &te, &rte);
    assert_same("unet", &unet, &runet);
    assert_same("vae", &vae, &rvae);
    // Layout: configs, scheduler, tokenizer, model_index.
    for (rel, src) in [
        (
            "unet/config.json",
            conv().join("diffusers/unet/config.json"),
        ),
        ("vae/config.json", conv().join("diffusers/vae/config.json")),
        (
            "text_encoder/config.json",
            conv().join("diffusers/text_encoder/config.json"),
        ),
    ] {
        assert_eq!(
            std::fs::read(out.join(rel)).unwrap(),
            std::fs::read(src).unwrap(),
            "{rel}"
        );
    }
    let sched: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("scheduler/scheduler_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(sched["_class_name"], "PNDMScheduler");
    assert_eq!(sched["beta_schedule"], "scaled_linear");
    assert_eq!(sched["steps_offset"], 1);
    assert_eq!(sched["skip_prk_steps"], true);
    assert_eq!(sched["set_alpha_to_one"], false);
    assert_eq!(sched["clip_sample"], false);
    assert_eq!(sched["num_train_timesteps"], 1000);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/clip");
    for f in ["vocab.json", "merges.txt"] {
        assert_eq!(
            std::fs::read(out.join("tokenizer").join(f)).unwrap(),
            std::fs::read(repo.join(f)).unwrap()
        );
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model_index.json")).unwrap()).unwrap();
    assert_eq!(index["unet"][1], "UNet2DConditionModel");
    // Nothing but the output folder is left next to it.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn ckpt_to_diffusers_matches_the_f16_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    convert_single_file_to_diffusers(&conv().join("tiny.ckpt"), &out, &tiny_opts()).unwrap();
    let (te, unet, vae) = outputs(&out);
    let (rte, runet, rvae) = reference();
    assert_same("text encoder", &te, &cast(&rte, DType::F16));
    assert_same("unet", &unet, &cast(&runet, DType::F16));
    assert_same("vae", &vae, &cast(&rvae, DType::F16));

    // --dtype f32 widens exactly.
    let out32 = tmp.path().join("model32");
    let opts = ToDiffusers {
        dtype: Some(DType::F32),
        ..tiny_opts()
    };
    convert_single_file_to_diffusers(&conv().join("tiny.ckpt"), &out32, &opts).unwrap();
    let (_, unet32, _) = outputs(&out32);
    assert_same(
        "unet f32",
        &unet32,
        &cast(&cast(&runet, DType::F16), DType::F32),
    );
}

#[test]
fn ckpt_ema_weights_replace_the_unet() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let opts = ToDiffusers {
        ema: true,
        ..tiny_opts()
    };
    convert_single_file_to_diffusers(&conv().join("tiny.ckpt"), &out, &opts).unwrap();
    let (_, unet, vae) = outputs(&out);
    let (_, runet, rvae) = reference();
    // The fixture's EMA weights are the UNet's * 0.5, stored in f16.
    let half: StateDict = runet
        .iter()
        .map(|(k, t)| {
            let mut t = t.clone();
            for c in t.data.chunks_exact_mut(4) {
                let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * 0.5;
                c.copy_from_slice(&v.to_le_bytes());
            }
            (k.clone(), t.cast(DType::F16))
        })
        .collect();
    assert_same("ema unet", &unet, &half);
    assert_same("vae", &vae, &cast(&rvae, DType::F16));

    // A file without EMA weights: --ema is an error, and nothing is written.
    let out2 = tmp.path().join("noema");
    let err = convert_single_file_to_diffusers(&conv().join("tiny.safetensors"), &out2, &opts)
        .unwrap_err();
    assert!(err.to_string().contains("EMA"), "{err}");
    assert!(!out2.exists());
}

#[test]
fn ckpt_and_safetensors_read_the_same_names() {
    let st = read_state_dict(&conv().join("tiny.safetensors")).unwrap();
    let ck = read_state_dict(&conv().join("tiny.ckpt")).unwrap();
    for (k, t) in &st {
        if k == "betas" || k == "alphas_cumprod" {
            continue;
        }
        let c = &ck[k];
        assert_eq!(c.shape, t.shape, "{k}");
        if t.dtype == DType::F32 {
            assert!(c.data == t.clone().cast(DType::F16).data, "{k}");
        } else {
            assert_eq!(c, t, "{k}");
        }
    }
}

#[test]
fn malicious_ckpt_is_refused_and_runs_nothing() {
    let marker = Path::new("/tmp/decorr-pwned-marker");
    let _ = std::fs::remove_file(marker);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let err = convert_single_file_to_diffusers(&conv().join("malicious.ckpt"), &out, &tiny_opts())
        .unwrap_err();
    assert!(matches!(err, ConvertError::RefusedGlobal { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("posix.system") || msg.contains("os.system"),
        "{msg}"
    );
    assert!(!marker.exists());
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

fn assert_fails_cleanly(input: &Path, opts: &ToDiffusers, needle: &str) -> ConvertError {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let err = convert_single_file_to_diffusers(input, &out, opts).unwrap_err();
    assert!(err.to_string().contains(needle), "{needle}: {err}");
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    err
}

#[test]
fn truncated_ckpt_is_a_clear_error() {
    assert_fails_cleanly(&conv().join("truncated.ckpt"), &tiny_opts(), "truncated");
}

#[test]
fn wrong_magic_and_truncated_safetensors_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("junk.safetensors");
    std::fs::write(&junk, b"hello, this is not a model file").unwrap();
    assert_fails_cleanly(
        &junk,
        &tiny_opts(),
        "neither a safetensors file nor a PyTorch zip",
    );
    let bytes = std::fs::read(conv().join("tiny.safetensors")).unwrap();
    let cut = tmp.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails_cleanly(&cut, &tiny_opts(), "bad safetensors file");
    let missing = tmp.path().join("missing.safetensors");
    assert_fails_cleanly(&missing, &tiny_opts(), "missing.safetensors");
}

#[test]
fn unknown_key_families_are_errors_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let base = read_safetensors(&conv().join("tiny.safetensors")).unwrap();
    let extra = base["betas"].clone();
    for key in [
        "controlnet.foo.weight",
        "model.diffusion_model.bogus.0.weight",
    ] {
        let mut sd = base.clone();
        sd.insert(key.to_string(), extra.clone());
        let p = tmp.path().join("odd.safetensors");
        write_safetensors(&p, &sd).unwrap();
        let err = assert_fails_cleanly(&p, &tiny_opts(), key);
        assert!(
            matches!(
                err,
                ConvertError::UnknownKeys { .. } | ConvertError::BadConfig { .. }
            ),
            "{err:?}"
        );
    }
}

#[test]
fn configs_that_do_not_fit_are_errors() {
    // The tiny model is not SD 1.5 shaped: the preset is refused by shape, auto cannot detect.
    let sd15 = ToDiffusers {
        config: ConfigChoice::Sd15,
        ..Default::default()
    };
    assert_fails_cleanly(&conv().join("tiny.safetensors"), &sd15, "does not describe");
    assert_fails_cleanly(
        &conv().join("tiny.safetensors"),
        &ToDiffusers::default(),
        "cannot detect",
    );
    // The sd2 preset on an SD 1.x file names the mismatch.
    let sd2 = ToDiffusers {
        config: ConfigChoice::Sd2,
        ..Default::default()
    };
    assert_fails_cleanly(&conv().join("tiny.safetensors"), &sd2, "use --config sd15");
    // decorr's own flag is `--checkpoint-config`: messages name the flag the caller has.
    let cli = ToDiffusers {
        config: ConfigChoice::Sd2,
        config_flag: "--checkpoint-config",
        ..Default::default()
    };
    let err = assert_fails_cleanly(
        &conv().join("tiny.safetensors"),
        &cli,
        "use --checkpoint-config sd15",
    )
    .to_string();
    assert!(!err.contains(" --config"), "{err}");
}

#[test]
fn existing_output_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let err = convert_single_file_to_diffusers(
        &conv().join("tiny.safetensors"),
        tmp.path(),
        &tiny_opts(),
    )
    .unwrap_err();
    assert!(matches!(err, ConvertError::OutputExists(_)), "{err:?}");
}

#[test]
fn diffusers_to_single_file_gives_back_the_ldm_file() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("model");
    convert_single_file_to_diffusers(&conv().join("tiny.safetensors"), &folder, &tiny_opts())
        .unwrap();
    let single = tmp.path().join("back.safetensors");
    convert_diffusers_to_single_file(&folder, &single, &ToSingleFile::default()).unwrap();
    let got = read_safetensors(&single).unwrap();
    let mut want = read_safetensors(&conv().join("tiny.safetensors")).unwrap();
    want.remove("betas");
    want.remove("alphas_cumprod");
    assert_same("single file", &got, &want);

    // Refuses to overwrite.
    let err =
        convert_diffusers_to_single_file(&folder, &single, &ToSingleFile::default()).unwrap_err();
    assert!(matches!(err, ConvertError::OutputExists(_)), "{err:?}");

    // A fine-tuned text encoder from another folder replaces the source's.
    let other = tmp.path().join("finetuned/text_encoder");
    std::fs::create_dir_all(&other).unwrap();
    let mut te = read_safetensors(&folder.join("text_encoder/model.safetensors")).unwrap();
    let w = te.get_mut("text_model.final_layer_norm.bias").unwrap();
    w.data.iter_mut().for_each(|b| *b = 0);
    write_safetensors(&other.join("model.safetensors"), &te).unwrap();
    let single2 = tmp.path().join("back2.safetensors");
    let opts = ToSingleFile {
        dtype: Some(DType::F16),
        text_encoder: Some(tmp.path().join("finetuned")),
        ..Default::default()
    };
    convert_diffusers_to_single_file(&folder, &single2, &opts).unwrap();
    let got2 = read_safetensors(&single2).unwrap();
    let b = &got2["cond_stage_model.transformer.text_model.final_layer_norm.bias"];
    assert_eq!(b.dtype, DType::F16);
    assert!(b.data.iter().all(|&x| x == 0));
    let pos = &got2["cond_stage_model.transformer.text_model.embeddings.position_ids"];
    assert_eq!(pos.dtype, DType::I64);
    assert_eq!(got2.len(), want.len());
}

/// A fixture's table of full-size tensor names (gzipped JSON from the fixture script).
fn name_table(file: &str) -> serde_json::Value {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(conv().join(file)).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The `(LDM name, diffusers name)` pairs of one model of a [`name_table`].
fn name_pairs(names: &serde_json::Value, part: &str) -> Vec<(String, String)> {
    names[part]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_string(),
                p[1].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// An all-zero f32 tensor: name tables only need shapes where detection reads them.
fn zeros(shape: Vec<usize>) -> decorr_convert::Tensor {
    let n: usize = shape.iter().product();
    decorr_convert::Tensor {
        dtype: DType::F32,
        shape,
        data: vec![0; n * 4],
    }
}

/// Every tensor name of full-size SD 1.5 (from the fixture script, checked there against
/// diffusers' converter) maps to diffusers' name with the embedded SD 1.5 configs, picked by
/// `auto` from the text encoder width; and back.
#[test]
fn sd15_names_map_like_diffusers_with_auto_config() {
    let names = name_table("sd15_names.json.gz");
    let pairs = |part: &str| name_pairs(&names, part);
    let mut sd = StateDict::new();
    for part in ["unet", "vae", "text_encoder"] {
        for (l, _) in pairs(part) {
            let shape = match l.as_str() {
                "model.diffusion_model.input_blocks.0.0.weight" => vec![320, 4, 1, 1],
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" => {
                    vec![1, 768]
                }
                "first_stage_model.encoder.conv_in.weight" => vec![128, 1, 1, 1],
                "cond_stage_model.transformer.text_model.final_layer_norm.weight" => vec![768],
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" => {
                    vec![49408, 1]
                }
                k if k.contains("mid.attn_1.") && k.ends_with("weight") && !k.contains("norm") => {
                    vec![1, 1, 1, 1]
                }
                _ => vec![1],
            };
            sd.insert(l, zeros(shape));
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("sd15.safetensors");
    write_safetensors(&file, &sd).unwrap();
    let out = tmp.path().join("model");
    convert_single_file_to_diffusers(&file, &out, &ToDiffusers::default()).unwrap();
    let (te, unet, vae) = outputs(&out);
    for (part, got) in [("unet", &unet), ("vae", &vae), ("text_encoder", &te)] {
        let mut want: Vec<String> = pairs(part).into_iter().map(|(_, d)| d).collect();
        want.sort();
        let got: Vec<String> = got.keys().cloned().collect();
        assert_eq!(got, want, "{part}");
    }
    assert_eq!(
        vae["encoder.mid_block.attentions.0.to_q.weight"].shape,
        vec![1, 1]
    );
    let unet_cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("unet/config.json")).unwrap()).unwrap();
    assert_eq!(unet_cfg["cross_attention_dim"], 768);

    // And back: the same LDM names (plus CLIP's position_ids buffer).
    let single = tmp.path().join("back.safetensors");
    convert_diffusers_to_single_file(&out, &single, &ToSingleFile::default()).unwrap();
    let back = read_safetensors(&single).unwrap();
    let mut want: Vec<&String> = sd.keys().collect();
    let pos = "cond_stage_model.transformer.text_model.embeddings.position_ids".to_string();
    want.push(&pos);
    want.sort();
    assert_eq!(back.keys().collect::<Vec<_>>(), want);
    assert_eq!(
        back["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape,
        vec![1, 1, 1, 1]
    );
}

/// decorr's own loaders read the converted folder, and the UNet computes exactly what the
/// diffusers folder the single file was made from computes.
#[test]
fn converted_folder_loads_in_decorr_and_matches_the_source_model() {
    use burn::tensor::{Device, Distribution, Tensor};
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    decorr_convert::convert_single_file_to_diffusers(
        &fx.join("convert/tiny.safetensors"),
        &out,
        &decorr_convert::ToDiffusers {
            config: decorr_convert::ConfigChoice::Dir(fx.join("convert/diffusers")),
            ..Default::default()
        },
    )
    .unwrap();
    let device = Device::flex();
    let ours =
        decorr_unet::load_unet(&decorr_core::ModelSource::Local(out.clone()), &device).unwrap();
    let orig = decorr_unet::load_unet(
        &decorr_core::ModelSource::Local(fx.join("unet_tiny_a")),
        &device,
    )
    .unwrap();
    decorr_unet::load_vae(&decorr_core::ModelSource::Local(out.clone()), &device).unwrap();
    decorr_clip::load_text_encoder(&decorr_core::ModelSource::Local(out), &device).unwrap();
    let x = Tensor::<4>::random([1, 4, 8, 8], Distribution::Normal(0.0, 1.0), &device);
    let ctx = Tensor::<3>::random([1, 5, 16], Distribution::Normal(0.0, 1.0), &device);
    let a = ours.model.forward(x.clone(), &[500.0], &ctx).into_data();
    let b = orig.model.forward(x, &[500.0], &ctx).into_data();
    assert_eq!(a, b, "same weights, same output");
}

// ---------------------------------------------------------------------------------------------
// SD 2.x (OpenCLIP text encoder): tests/fixtures/convert/sd2/, made and checked against
// diffusers' own functions by tests/pyref/make_convert_fixtures.py (`sd2()`, `sd2_names()`).

fn sd2_dir() -> PathBuf {
    conv().join("sd2")
}

fn sd2_opts() -> ToDiffusers {
    ToDiffusers {
        config: ConfigChoice::Dir(sd2_dir().join("diffusers")),
        ..Default::default()
    }
}

fn sd2_reference() -> (StateDict, StateDict, StateDict) {
    outputs(&sd2_dir().join("diffusers"))
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The tiny SD 2-like file (3 OpenCLIP resblocks, a config keeping 2) converts to exactly the
/// tensors diffusers' convert_open_clip_checkpoint / convert_ldm_unet_checkpoint /
/// convert_ldm_vae_checkpoint give, with SD 2's scheduler and tokenizer files.
#[test]
fn sd2_safetensors_to_diffusers_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let s =
        convert_single_file_to_diffusers(&sd2_dir().join("tiny.safetensors"), &out, &sd2_opts())
            .unwrap();
    // 2 layers x 16 + embeddings and final norm; dropped: resblocks.2 (12), text_projection,
    // logit_scale, betas, alphas_cumprod.
    assert_eq!((s.text_encoder, s.ignored), (36, 16));
    let (te, unet, vae) = outputs(&out);
    let (rte, runet, rvae) = sd2_reference();
    assert_same("sd2 text encoder", &te, &rte);
    assert_same("sd2 unet", &unet, &runet);
    assert_same("sd2 vae", &vae, &rvae);
    // No scheduler/ in the config folder: SD 2's (diffusers' stable-diffusion-2-1 one).
    let sched = json(&out.join("scheduler/scheduler_config.json"));
    assert_eq!(sched["_class_name"], "DDIMScheduler");
    assert_eq!(sched["prediction_type"], "v_prediction");
    assert_eq!(sched["beta_schedule"], "scaled_linear");
    assert_eq!(
        json(&out.join("model_index.json"))["scheduler"][1],
        "DDIMScheduler"
    );
    let special = json(&out.join("tokenizer/special_tokens_map.json"));
    assert_eq!(special["pad_token"], "!");
    assert_eq!(
        json(&out.join("tokenizer/tokenizer_config.json"))["pad_token"],
        "!"
    );
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/clip");
    for f in ["vocab.json", "merges.txt"] {
        assert_eq!(
            std::fs::read(out.join("tokenizer").join(f)).unwrap(),
            std::fs::read(repo.join(f)).unwrap()
        );
    }
    // The vocabulary's "!" is id 0, the padding id of SD 2's tokenizer.
    let vocab = json(&repo.join("vocab.json"));
    assert_eq!(vocab["!"], 0);

    // --prediction epsilon (the 512 base models) overrides it.
    let out2 = tmp.path().join("eps");
    let opts = ToDiffusers {
        prediction: Some(decorr_convert::Prediction::Epsilon),
        ..sd2_opts()
    };
    convert_single_file_to_diffusers(&sd2_dir().join("tiny.safetensors"), &out2, &opts).unwrap();
    let sched = json(&out2.join("scheduler/scheduler_config.json"));
    assert_eq!(sched["prediction_type"], "epsilon");
    assert_eq!(sched["_class_name"], "DDIMScheduler");
}

/// decorr's loaders read the converted SD 2 folder, and its UNet computes what the reference
/// folder (diffusers' conversion) computes.
#[test]
fn sd2_converted_folder_loads_in_decorr() {
    use burn::tensor::{Device, Distribution, Tensor};
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    convert_single_file_to_diffusers(&sd2_dir().join("tiny.safetensors"), &out, &sd2_opts())
        .unwrap();
    let device = Device::flex();
    let te = decorr_clip::load::load_text_encoder_dir(&out.join("text_encoder"), &device).unwrap();
    drop(te);
    // SD 2's tokenizer pads with "!" (id 0) after EOS, as diffusers' CLIPTokenizer does.
    let tok = decorr_clip::load_tokenizer(&decorr_core::ModelSource::Local(out.clone())).unwrap();
    let ids = tok.encode("a red cube").unwrap();
    assert_eq!(&ids.ids[ids.eos_index() + 1..], &[0u32; 72][..]);
    decorr_unet::load_vae(&decorr_core::ModelSource::Local(out.clone()), &device).unwrap();
    let ours = decorr_unet::load_unet(&decorr_core::ModelSource::Local(out), &device).unwrap();
    let reference = decorr_unet::load_unet(
        &decorr_core::ModelSource::Local(sd2_dir().join("diffusers")),
        &device,
    )
    .unwrap();
    let x = Tensor::<4>::random([1, 4, 8, 8], Distribution::Normal(0.0, 1.0), &device);
    let ctx = Tensor::<3>::random([1, 5, 32], Distribution::Normal(0.0, 1.0), &device);
    let a = ours.model.forward(x.clone(), &[500.0], &ctx).into_data();
    let b = reference.model.forward(x, &[500.0], &ctx).into_data();
    assert_eq!(a, b, "same weights, same output");
}

/// Back to one file: OpenCLIP names with q/k/v fused again, bit-identical to the original file
/// less what the diffusers layout cannot hold (the dropped last resblock, text_projection,
/// logit_scale, the schedule buffers); and that file converts to the same folder again.
#[test]
fn sd2_diffusers_to_single_file_gives_back_the_ldm_file() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("model");
    convert_single_file_to_diffusers(&sd2_dir().join("tiny.safetensors"), &folder, &sd2_opts())
        .unwrap();
    let single = tmp.path().join("back.safetensors");
    let s = convert_diffusers_to_single_file(&folder, &single, &ToSingleFile::default()).unwrap();
    assert_eq!(s.text_encoder, 36);
    let got = read_safetensors(&single).unwrap();
    let mut want = read_safetensors(&sd2_dir().join("tiny.safetensors")).unwrap();
    want.retain(|k, _| {
        !k.starts_with("cond_stage_model.model.transformer.resblocks.2.")
            && !matches!(
                k.as_str(),
                "betas"
                    | "alphas_cumprod"
                    | "cond_stage_model.model.text_projection"
                    | "cond_stage_model.model.logit_scale"
            )
    });
    assert_same("sd2 single file", &got, &want);
    let again = tmp.path().join("again");
    convert_single_file_to_diffusers(&single, &again, &sd2_opts()).unwrap();
    let (te, unet, vae) = outputs(&again);
    let (rte, runet, rvae) = sd2_reference();
    assert_same("sd2 text encoder", &te, &rte);
    assert_same("sd2 unet", &unet, &runet);
    assert_same("sd2 vae", &vae, &rvae);
}

#[test]
fn sd2_errors_are_clear() {
    let tiny = sd2_dir().join("tiny.safetensors");
    // Presets: sd15 on an OpenCLIP file, sd2 on a tiny one (shapes), auto (width 32).
    let sd15 = ToDiffusers {
        config: ConfigChoice::Sd15,
        ..Default::default()
    };
    assert_fails_cleanly(&tiny, &sd15, "use --config sd2");
    let sd2 = ToDiffusers {
        config: ConfigChoice::Sd2,
        ..Default::default()
    };
    assert_fails_cleanly(&tiny, &sd2, "does not describe");
    assert_fails_cleanly(
        &tiny,
        &ToDiffusers::default(),
        "OpenCLIP text encoder width Some(32)",
    );

    let tmp = tempfile::tempdir().unwrap();
    let base = read_safetensors(&tiny).unwrap();
    // A config wanting more layers than the file has.
    let cfg = tmp.path().join("cfg");
    for part in ["unet", "vae", "text_encoder"] {
        std::fs::create_dir_all(cfg.join(part)).unwrap();
        std::fs::copy(
            sd2_dir().join("diffusers").join(part).join("config.json"),
            cfg.join(part).join("config.json"),
        )
        .unwrap();
    }
    let mut tcfg = json(&cfg.join("text_encoder/config.json"));
    tcfg["num_hidden_layers"] = 5.into();
    std::fs::write(
        cfg.join("text_encoder/config.json"),
        serde_json::to_vec(&tcfg).unwrap(),
    )
    .unwrap();
    let opts = ToDiffusers {
        config: ConfigChoice::Dir(cfg),
        ..Default::default()
    };
    assert_fails_cleanly(&tiny, &opts, "has 3 resblocks");
    // Unknown OpenCLIP names (the image tower) are named.
    let mut sd = base.clone();
    sd.insert(
        "cond_stage_model.model.visual.proj".into(),
        base["cond_stage_model.model.text_projection"].clone(),
    );
    let p = tmp.path().join("visual.safetensors");
    write_safetensors(&p, &sd).unwrap();
    assert_fails_cleanly(&p, &sd2_opts(), "cond_stage_model.model.visual.proj");
    // A fused q/k/v that cannot be split in three.
    let mut sd = base.clone();
    let key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias";
    let t = sd.get_mut(key).unwrap();
    t.shape[0] -= 1;
    t.data.truncate(t.data.len() - 4);
    let p = tmp.path().join("qkv.safetensors");
    write_safetensors(&p, &sd).unwrap();
    assert_fails_cleanly(&p, &sd2_opts(), key);
    // Both text encoder kinds in one file.
    let mut sd = base.clone();
    sd.insert(
        "cond_stage_model.transformer.text_model.final_layer_norm.weight".into(),
        base["cond_stage_model.model.ln_final.weight"].clone(),
    );
    let p = tmp.path().join("both.safetensors");
    write_safetensors(&p, &sd).unwrap();
    assert_fails_cleanly(&p, &sd2_opts(), "both");
}

/// Every tensor name of full-size SD 2.x (from the fixture script, checked there against
/// diffusers' functions) maps to diffusers' name with the embedded SD 2 configs, picked by
/// `auto` from the OpenCLIP text encoder's width; and back.
#[test]
fn sd2_names_map_like_diffusers_with_auto_config() {
    let names = name_table("sd2_names.json.gz");
    let pairs = |part: &str| name_pairs(&names, part);
    let ignored: Vec<String> = names["ignored"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ignored.len(), 14);
    let shape_of = |l: &str| match l {
        "model.diffusion_model.input_blocks.0.0.weight" => vec![320, 4, 1, 1],
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" => {
            vec![1, 1024]
        }
        "first_stage_model.encoder.conv_in.weight" => vec![128, 1, 1, 1],
        "cond_stage_model.model.ln_final.weight" => vec![1024],
        "cond_stage_model.model.token_embedding.weight" => vec![49408, 1],
        k if k.ends_with("attn.in_proj_weight") => vec![3, 1],
        k if k.ends_with("attn.in_proj_bias") => vec![3],
        k if k.contains("mid.attn_1.") && k.ends_with("weight") && !k.contains("norm") => {
            vec![1, 1, 1, 1]
        }
        _ => vec![1],
    };
    let mut sd = StateDict::new();
    for part in ["unet", "vae", "text_encoder"] {
        for (l, _) in pairs(part) {
            let shape = shape_of(&l);
            sd.insert(l, zeros(shape));
        }
    }
    for l in &ignored {
        sd.insert(l.clone(), zeros(shape_of(l)));
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("sd2.safetensors");
    write_safetensors(&file, &sd).unwrap();
    let out = tmp.path().join("model");
    let s = convert_single_file_to_diffusers(&file, &out, &ToDiffusers::default()).unwrap();
    assert_eq!(s.ignored, 14);
    let (te, unet, vae) = outputs(&out);
    for (part, got) in [("unet", &unet), ("vae", &vae), ("text_encoder", &te)] {
        let mut want: Vec<String> = pairs(part).into_iter().map(|(_, d)| d).collect();
        want.sort();
        want.dedup();
        let got: Vec<String> = got.keys().cloned().collect();
        assert_eq!(got, want, "{part}");
    }
    assert_eq!(
        te["text_model.encoder.layers.22.self_attn.v_proj.weight"].shape,
        vec![1, 1]
    );
    let unet_cfg = json(&out.join("unet/config.json"));
    assert_eq!(unet_cfg["cross_attention_dim"], 1024);
    assert_eq!(unet_cfg["use_linear_projection"], true);
    assert_eq!(
        unet_cfg["attention_head_dim"],
        serde_json::json!([5, 10, 20, 20])
    );
    assert_eq!(unet_cfg["sample_size"], 96);
    let text_cfg = json(&out.join("text_encoder/config.json"));
    assert_eq!(text_cfg["num_hidden_layers"], 23);
    assert_eq!(text_cfg["hidden_act"], "gelu");
    assert_eq!(
        json(&out.join("scheduler/scheduler_config.json"))["prediction_type"],
        "v_prediction"
    );
    // The embedded configs are ones decorr's own loaders accept as SD 2.
    let c: decorr_clip::ClipTextConfig = serde_json::from_value(text_cfg).unwrap();
    assert_eq!(c, {
        let mut p = decorr_clip::ClipTextConfig::sd2();
        p.extra = c.extra.clone();
        p
    });

    // And back: the same LDM names, less those diffusers drops.
    let single = tmp.path().join("back.safetensors");
    convert_diffusers_to_single_file(&out, &single, &ToSingleFile::default()).unwrap();
    let back = read_safetensors(&single).unwrap();
    let want: Vec<&String> = sd.keys().filter(|k| !ignored.contains(k)).collect();
    assert_eq!(back.keys().collect::<Vec<_>>(), want);

    // auto + epsilon: the 512 base models' sizes.
    let eps = tmp.path().join("eps");
    let opts = ToDiffusers {
        prediction: Some(decorr_convert::Prediction::Epsilon),
        ..Default::default()
    };
    convert_single_file_to_diffusers(&file, &eps, &opts).unwrap();
    assert_eq!(json(&eps.join("unet/config.json"))["sample_size"], 64);
    assert_eq!(json(&eps.join("vae/config.json"))["sample_size"], 512);
    assert_eq!(
        json(&eps.join("scheduler/scheduler_config.json"))["prediction_type"],
        "epsilon"
    );
}

/// `--weights FILE`'s route: the same conversion held in memory. Its files are byte for byte the
/// folder's, and decorr's loaders read the same weights from it (same outputs, bit for bit).
#[test]
fn in_memory_conversion_loads_like_the_folder() {
    use burn::tensor::{Device, Distribution, Int, Tensor};
    use decorr_core::{MemoryModel, ModelSource};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let file = conv().join("tiny.safetensors");
    let s = convert_single_file_to_diffusers(&file, &out, &tiny_opts()).unwrap();
    let (model, s2) = decorr_convert::convert_single_file(&file, &tiny_opts()).unwrap();
    assert_eq!(s, s2);
    // The same files with the same bytes, and nothing else in the folder.
    let mut on_disk = Vec::new();
    let mut stack = vec![out.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                on_disk.push(p.strip_prefix(&out).unwrap().to_str().unwrap().to_string());
            }
        }
    }
    on_disk.sort();
    let in_memory: Vec<String> = model.files().map(|(rel, _)| rel.to_string()).collect();
    assert_eq!(in_memory, on_disk);
    for (rel, bytes) in model.files() {
        assert!(std::fs::read(out.join(rel)).unwrap() == bytes, "{rel}");
    }
    assert_eq!(
        model.description(),
        format!("{} (converted)", file.display())
    );

    let device = Device::flex();
    let disk = ModelSource::Local(out);
    let mem = ModelSource::Memory(Arc::new(model.clone()));
    let x = Tensor::<4>::random([1, 4, 8, 8], Distribution::Normal(0.0, 1.0), &device);
    let ctx = Tensor::<3>::random([1, 5, 16], Distribution::Normal(0.0, 1.0), &device);
    let a = decorr_unet::load_unet(&mem, &device).unwrap();
    let b = decorr_unet::load_unet(&disk, &device).unwrap();
    assert_eq!(
        a.weights_path.to_string(),
        format!(
            "{} (converted) unet/diffusion_pytorch_model.safetensors",
            file.display()
        )
    );
    assert_eq!(a.config, b.config);
    assert_eq!(
        a.model.forward(x.clone(), &[500.0], &ctx).into_data(),
        b.model.forward(x, &[500.0], &ctx).into_data()
    );
    let img = Tensor::<4>::random([1, 3, 16, 16], Distribution::Normal(0.0, 1.0), &device);
    let a = decorr_unet::load_vae(&mem, &device).unwrap();
    let b = decorr_unet::load_vae(&disk, &device).unwrap();
    assert_eq!(
        a.model.encode(img.clone(), None).mean.into_data(),
        b.model.encode(img, None).mean.into_data()
    );
    let lat = Tensor::<4>::random([1, 4, 8, 8], Distribution::Normal(0.0, 1.0), &device);
    assert_eq!(
        a.model.decode(lat.clone(), None).into_data(),
        b.model.decode(lat, None).into_data()
    );
    let a = decorr_clip::load_text_encoder(&mem, &device).unwrap();
    let b = decorr_clip::load_text_encoder(&disk, &device).unwrap();
    let vocab = a.config.vocab_size as i64;
    let ids = Tensor::<2, Int>::from_data(
        burn::tensor::TensorData::new((0..7).map(|i| i % vocab).collect::<Vec<i64>>(), [1, 7]),
        &device,
    );
    assert_eq!(
        a.model.forward(ids.clone()).into_data(),
        b.model.forward(ids).into_data()
    );
    let ta = decorr_clip::load_tokenizer(&mem).unwrap();
    let tb = decorr_clip::load_tokenizer(&disk).unwrap();
    assert_eq!(
        ta.encode("a photo of rusty tracks").unwrap().ids,
        tb.encode("a photo of rusty tracks").unwrap().ids
    );

    // A file that does not fit is named by its in-memory name.
    let mut wrong = MemoryModel::new(model.description());
    for (rel, bytes) in model.files() {
        let bytes = match rel {
            "vae/diffusion_pytorch_model.safetensors" => model
                .file("unet/diffusion_pytorch_model.safetensors")
                .unwrap()
                .read_bytes()
                .unwrap()
                .into_owned(),
            _ => bytes.to_vec(),
        };
        wrong.insert(rel, bytes);
    }
    let err = decorr_unet::load_vae(&ModelSource::Memory(Arc::new(wrong)), &device)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tiny.safetensors (converted) vae/diffusion_pytorch_model.safetensors"),
        "{err}"
    );
}
