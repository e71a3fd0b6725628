//! SDXL single-file <-> diffusers conversion against diffusers, on the fixtures of
//! tests/pyref/make_sdxl_convert_fixtures.py (tests/fixtures/sdxl_convert/): the tiny random
//! SDXL model of tests/fixtures/sdxl_tiny written as a single file in the original SDXL
//! naming (the reference file, stored as per-tensor digests: dtype, shape, CRC-32) and what
//! diffusers' `StableDiffusionXLPipeline.from_single_file` loaded from it (digests too), plus
//! every tensor name of full-size SDXL base (`sdxl_names.json.gz`).
//!
//! The reference file is rebuilt here by the crate's own diffusers -> single-file converter, so
//! matching digests mean it wrote exactly that file; converting it back must give exactly
//! diffusers' tensors.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use decorr_convert::{
    ConfigChoice, ConvertError, DType, StateDict, Summary, Tensor, ToDiffusers, ToSingleFile,
    convert_diffusers_to_single_file, convert_single_file_to_diffusers,
    tensor::{read_safetensors, write_safetensors},
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tiny() -> PathBuf {
    fixtures().join("sdxl_tiny")
}

fn fixture(file: &str) -> PathBuf {
    fixtures().join("sdxl_convert").join(file)
}

fn gz_json(path: &Path) -> serde_json::Value {
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The configs of the tiny model (`--config tests/fixtures/sdxl_tiny`).
fn tiny_opts() -> ToDiffusers {
    ToDiffusers {
        config: ConfigChoice::Dir(tiny()),
        ..Default::default()
    }
}

/// One tensor's digest as the fixture script writes it.
#[derive(Debug, PartialEq)]
struct Digest {
    dtype: String,
    shape: Vec<usize>,
    crc32: u32,
}

fn digest(t: &Tensor) -> Digest {
    let mut crc = flate2::Crc::new();
    crc.update(&t.data);
    Digest {
        dtype: format!("{:?}", t.dtype).to_uppercase(),
        shape: t.shape.clone(),
        crc32: crc.sum(),
    }
}

fn digests(v: &serde_json::Value) -> BTreeMap<String, Digest> {
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, d)| {
            let digest = Digest {
                dtype: d["dtype"].as_str().unwrap().to_string(),
                shape: d["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as usize)
                    .collect(),
                crc32: d["crc32"].as_u64().unwrap() as u32,
            };
            (k.clone(), digest)
        })
        .collect()
}

/// Same names, and per tensor the same dtype, shape and bytes (CRC-32), as the reference.
fn assert_matches(what: &str, got: &StateDict, want: &serde_json::Value) {
    let want = digests(want);
    let gk: Vec<&String> = got.keys().collect();
    let wk: Vec<&String> = want.keys().collect();
    assert_eq!(gk, wk, "{what}: tensor names differ");
    for (k, w) in &want {
        assert_eq!(&digest(&got[k]), w, "{what}: `{k}` differs");
    }
}

fn assert_same(what: &str, got: &StateDict, want: &StateDict) {
    let gk: Vec<_> = got.keys().collect();
    let wk: Vec<_> = want.keys().collect();
    assert_eq!(gk, wk, "{what}: tensor names differ");
    for (k, w) in want {
        assert!(&got[k] == w, "{what}: `{k}` differs");
    }
}

/// The four models of a diffusers folder.
fn models(dir: &Path) -> [(&'static str, StateDict); 4] {
    let read = |rel: &str| read_safetensors(&dir.join(rel)).unwrap();
    [
        ("text_encoder", read("text_encoder/model.safetensors")),
        ("text_encoder_2", read("text_encoder_2/model.safetensors")),
        ("unet", read("unet/diffusion_pytorch_model.safetensors")),
        ("vae", read("vae/diffusion_pytorch_model.safetensors")),
    ]
}

/// tests/fixtures/sdxl_tiny as one SDXL single file, written by the crate.
fn single_file(dir: &Path) -> (PathBuf, Summary) {
    let path = dir.join("sdxl_tiny.safetensors");
    let s = convert_diffusers_to_single_file(&tiny(), &path, &ToSingleFile::default()).unwrap();
    (path, s)
}

fn assert_fails(input: &Path, opts: &ToDiffusers, needle: &str) -> ConvertError {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let err = convert_single_file_to_diffusers(input, &out, opts).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(needle), "`{needle}` not in: {msg}");
    assert!(!out.exists(), "a failed conversion left {}", out.display());
    err
}

/// A variant of the single file: `edit` applied to its tensors.
fn variant(dir: &Path, name: &str, edit: impl FnOnce(&mut StateDict)) -> PathBuf {
    let (file, _) = single_file(&dir.join(format!("{name}-src")));
    let mut sd = read_safetensors(&file).unwrap();
    edit(&mut sd);
    let p = dir.join(format!("{name}.safetensors"));
    write_safetensors(&p, &sd).unwrap();
    p
}

/// The diffusers folder -> one file: every tensor name, dtype, shape and byte of the reference
/// single file (the original SDXL naming, checked against diffusers' loader by the fixture
/// script).
#[test]
fn sdxl_folder_to_single_file_is_the_reference_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, s) = single_file(tmp.path());
    assert_eq!(
        (s.text_encoder, s.text_encoder_2, s.unet, s.vae),
        (52, 69, 408, 124)
    );
    let reference = gz_json(&fixture("reference.json.gz"));
    let got = read_safetensors(&path).unwrap();
    assert_matches("single file", &got, &reference["single_file"]);
    // The original layout of the second encoder's projection: [width 24, projection 20].
    assert_eq!(
        got["conditioner.embedders.1.model.text_projection"].shape,
        vec![24, 20]
    );
    assert_eq!(
        got["model.diffusion_model.label_emb.0.0.weight"].shape,
        vec![64, 68]
    );
    // Nothing but the file is left next to it.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

/// The single file -> a diffusers folder: exactly the tensors diffusers' from_single_file
/// loaded (names, dtypes, shapes, bytes), with SDXL's folder layout.
#[test]
fn sdxl_single_file_to_diffusers_matches_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, _) = single_file(tmp.path());
    let out = tmp.path().join("model");
    let s = convert_single_file_to_diffusers(&file, &out, &tiny_opts()).unwrap();
    // position_ids is dropped (transformers does not store it).
    assert_eq!(
        (s.text_encoder, s.text_encoder_2, s.unet, s.vae, s.ignored),
        (52, 69, 408, 124, 0)
    );
    let reference = gz_json(&fixture("reference.json.gz"));
    for (part, got) in models(&out) {
        assert_matches(part, &got, &reference["diffusers"][part]);
    }
    for rel in [
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "text_encoder_2/config.json",
        "scheduler/scheduler_config.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(rel)).unwrap(),
            std::fs::read(tiny().join(rel)).unwrap(),
            "{rel}"
        );
    }
    // model_index.json as diffusers' save_pretrained writes it for this pipeline.
    assert_eq!(
        json(&out.join("model_index.json")),
        json(&fixture("model_index.json"))
    );
    assert_eq!(
        json(&out.join("tokenizer_2/special_tokens_map.json"))["pad_token"],
        "!"
    );
    assert_eq!(
        json(&out.join("tokenizer_2/tokenizer_config.json"))["pad_token"],
        "!"
    );
    assert_eq!(
        json(&out.join("tokenizer/special_tokens_map.json"))["pad_token"],
        "<|endoftext|>"
    );
    let clip = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/clip");
    for dir in ["tokenizer", "tokenizer_2"] {
        for f in ["vocab.json", "merges.txt"] {
            assert!(
                std::fs::read(out.join(dir).join(f)).unwrap()
                    == std::fs::read(clip.join(f)).unwrap(),
                "{dir}/{f}"
            );
        }
    }
    assert_eq!(
        json(&out.join("vae/config.json"))["scaling_factor"],
        0.13025
    );
    // Nothing but the file and the folder are left.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 2);
}

/// Folder -> file -> folder -> file: the tensors of tests/fixtures/sdxl_tiny come back (CLIP-L
/// with transformers' `text_model.` prefix, which transformers 5.24 leaves out), and the second
/// file equals the first.
#[test]
fn sdxl_round_trip_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, _) = single_file(tmp.path());
    let folder = tmp.path().join("model");
    convert_single_file_to_diffusers(&file, &folder, &tiny_opts()).unwrap();
    for (part, got) in models(&folder) {
        let mut want = models(&tiny())
            .into_iter()
            .find(|(p, _)| *p == part)
            .unwrap()
            .1;
        if part == "text_encoder" {
            want = want
                .into_iter()
                .map(|(k, t)| (format!("text_model.{k}"), t))
                .collect();
        }
        assert_same(part, &got, &want);
    }
    let again = tmp.path().join("again.safetensors");
    convert_diffusers_to_single_file(&folder, &again, &ToSingleFile::default()).unwrap();
    assert_same(
        "single file",
        &read_safetensors(&again).unwrap(),
        &read_safetensors(&file).unwrap(),
    );
    // Casting: f16 on the way out, then back to f32, equals the f16-rounded weights.
    let half = tmp.path().join("half.safetensors");
    let opts = ToSingleFile {
        dtype: Some(DType::F16),
        ..Default::default()
    };
    convert_diffusers_to_single_file(&folder, &half, &opts).unwrap();
    let h = read_safetensors(&half).unwrap();
    assert_eq!(
        h["conditioner.embedders.1.model.text_projection"].dtype,
        DType::F16
    );
    assert_eq!(
        h["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"].dtype,
        DType::I64
    );
}

/// Fine-tuned encoders merged back: `text_encoder` and `text_encoder_2` taken from other
/// folders (a component folder, or a diffusers folder holding one) replace the source's.
#[test]
fn sdxl_replaced_encoders_go_into_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let scaled = |src: &str, dst: &Path, key: &str| {
        std::fs::create_dir_all(dst).unwrap();
        std::fs::copy(
            tiny().join(src).join("config.json"),
            dst.join("config.json"),
        )
        .unwrap();
        let mut sd = read_safetensors(&tiny().join(src).join("model.safetensors")).unwrap();
        let t = sd.get_mut(key).unwrap();
        for b in t.data.chunks_exact_mut(4) {
            let v = f32::from_le_bytes(b.try_into().unwrap()) * 2.0 + 1.0;
            b.copy_from_slice(&v.to_le_bytes());
        }
        let changed = t.clone();
        write_safetensors(&dst.join("model.safetensors"), &sd).unwrap();
        changed
    };
    let te1 = scaled(
        "text_encoder",
        &tmp.path().join("te1"),
        "final_layer_norm.weight",
    );
    // Given as a diffusers folder holding text_encoder_2/.
    let te2 = scaled(
        "text_encoder_2",
        &tmp.path().join("tuned/text_encoder_2"),
        "text_model.final_layer_norm.weight",
    );
    let out = tmp.path().join("merged.safetensors");
    let opts = ToSingleFile {
        text_encoder: Some(tmp.path().join("te1")),
        text_encoder_2: Some(tmp.path().join("tuned")),
        ..Default::default()
    };
    convert_diffusers_to_single_file(&tiny(), &out, &opts).unwrap();
    let got = read_safetensors(&out).unwrap();
    assert!(got["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] == te1);
    assert!(got["conditioner.embedders.1.model.ln_final.weight"] == te2);
    let (plain, _) = single_file(tmp.path());
    let plain = read_safetensors(&plain).unwrap();
    let differ: Vec<&String> = got.keys().filter(|k| got[*k] != plain[*k]).collect();
    assert_eq!(differ.len(), 2, "{differ:?}");

    // A second encoder asked for that does not exist.
    let opts = ToSingleFile {
        text_encoder_2: Some(tmp.path().join("nowhere")),
        ..Default::default()
    };
    let err = convert_diffusers_to_single_file(&tiny(), &tmp.path().join("x.st"), &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nowhere") && err.contains("does not exist"),
        "{err}"
    );
}

/// Variants real files have: the projection as the official diffusers->SDXL script writes it
/// (`text_projection.weight`, Linear layout), and buffers no diffusers model holds
/// (`logit_scale`, the denoiser's sigmas) give the same folder.
#[test]
fn sdxl_file_variants_convert_to_the_same_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, _) = single_file(tmp.path());
    let base = tmp.path().join("base");
    convert_single_file_to_diffusers(&file, &base, &tiny_opts()).unwrap();
    let p = "conditioner.embedders.1.model.";
    let linear = read_safetensors(&base.join("text_encoder_2/model.safetensors")).unwrap()
        ["text_projection.weight"]
        .clone();
    let v = variant(tmp.path(), "official", |sd| {
        sd.remove(&format!("{p}text_projection")).unwrap();
        sd.insert(format!("{p}text_projection.weight"), linear.clone());
        sd.insert(
            format!("{p}logit_scale"),
            Tensor {
                dtype: DType::F32,
                shape: vec![],
                data: 4.6052f32.to_le_bytes().to_vec(),
            },
        );
        sd.insert(
            "denoiser.sigmas".into(),
            Tensor {
                dtype: DType::F32,
                shape: vec![2],
                data: [0.03f32, 14.6]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            },
        );
    });
    let out = tmp.path().join("out");
    let s = convert_single_file_to_diffusers(&v, &out, &tiny_opts()).unwrap();
    assert_eq!(s.ignored, 2);
    for ((part, got), (_, want)) in models(&out).into_iter().zip(models(&base)) {
        assert_same(part, &got, &want);
    }
    // Both forms at once are refused.
    let both = variant(tmp.path(), "both", |sd| {
        sd.insert(format!("{p}text_projection.weight"), linear.clone());
    });
    assert_fails(&both, &tiny_opts(), "both");
}

/// The family comes from the tensor names: SDXL's encoders pick SDXL (and refuse the SD
/// presets), SD 1.x and SD 2.x files refuse the SDXL preset.
#[test]
fn sdxl_is_detected_from_the_names() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, _) = single_file(tmp.path());
    let preset = |config| ToDiffusers {
        config,
        ..Default::default()
    };
    // Auto: SDXL names, but not SDXL base's widths (16 and 24).
    assert_fails(
        &file,
        &ToDiffusers::default(),
        "SDXL-named file (text encoder widths Some(16) and Some(24)",
    );
    assert_fails(&file, &preset(ConfigChoice::Sd15), "use --config sdxl");
    assert_fails(&file, &preset(ConfigChoice::Sd2), "use --config sdxl");
    // The SDXL preset on the tiny file: its shapes do not fit SDXL base's configs.
    assert_fails(&file, &preset(ConfigChoice::Sdxl), "does not describe");
    let conv = fixtures().join("convert");
    assert_fails(
        &conv.join("tiny.safetensors"),
        &preset(ConfigChoice::Sdxl),
        "use --config sd15",
    );
    assert_fails(
        &conv.join("sd2/tiny.safetensors"),
        &preset(ConfigChoice::Sdxl),
        "use --config sd2",
    );
    // An SDXL config folder for an SD 1.x file is caught by the tensors it does not describe.
    assert_fails(
        &conv.join("tiny.safetensors"),
        &tiny_opts(),
        "does not describe",
    );
    assert_eq!("sdxl".parse::<ConfigChoice>(), Ok(ConfigChoice::Sdxl));
}

/// A change made to a single file's tensors.
type Edit = Box<dyn FnOnce(&mut StateDict)>;

/// A file with SDXL names missing a part, or mixing in another model's, is refused naming
/// what is missing or wrong; and so is a config folder that cannot describe it.
#[test]
fn sdxl_incomplete_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let drop_prefix =
        |prefix: &'static str| move |sd: &mut StateDict| sd.retain(|k, _| !k.starts_with(prefix));
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "no-te2",
            Box::new(drop_prefix("conditioner.embedders.1.")),
            "no second text encoder (OpenCLIP bigG, `conditioner.embedders.1.model.*`)",
        ),
        (
            "no-te1",
            Box::new(drop_prefix("conditioner.embedders.0.")),
            "no first text encoder (CLIP ViT-L, `conditioner.embedders.0.transformer.*`)",
        ),
        (
            "no-text",
            Box::new(drop_prefix("conditioner.")),
            "no text encoder (SDXL: conditioner.embedders.0.transformer.*",
        ),
        (
            "no-unet",
            Box::new(drop_prefix("model.diffusion_model.")),
            "no UNet (model.diffusion_model.*)",
        ),
        (
            "no-vae",
            Box::new(drop_prefix("first_stage_model.")),
            "no VAE (first_stage_model.*)",
        ),
        (
            "no-projection",
            Box::new(|sd: &mut StateDict| {
                sd.remove("conditioner.embedders.1.model.text_projection");
            }),
            "`conditioner.embedders.1.model.text_projection`: SDXL's second text encoder needs its projection",
        ),
        (
            "refiner",
            Box::new(|sd: &mut StateDict| {
                let moved: StateDict = std::mem::take(sd)
                    .into_iter()
                    .filter(|(k, _)| !k.starts_with("conditioner.embedders.0."))
                    .map(|(k, t)| {
                        (
                            k.replace("conditioner.embedders.1.", "conditioner.embedders.0."),
                            t,
                        )
                    })
                    .collect();
                *sd = moved;
            }),
            "SDXL refiner",
        ),
        (
            "mixed",
            Box::new(|sd: &mut StateDict| {
                let t = sd["conditioner.embedders.1.model.ln_final.weight"].clone();
                sd.insert("cond_stage_model.model.ln_final.weight".into(), t);
            }),
            "mixes SD 1.x/2.x text encoder tensors",
        ),
        (
            "unknown",
            Box::new(|sd: &mut StateDict| {
                let t = sd["conditioner.embedders.1.model.ln_final.weight"].clone();
                sd.insert("conditioner.embedders.2.weight".into(), t);
            }),
            "conditioner.embedders.2.weight",
        ),
        (
            "inpaint",
            Box::new(|sd: &mut StateDict| {
                let t = sd
                    .get_mut("model.diffusion_model.input_blocks.0.0.weight")
                    .unwrap();
                t.shape[1] = 9;
                t.data = vec![0; t.shape.iter().product::<usize>() * 4];
            }),
            "`in_channels` is 4 but tensor `conv_in.weight` has shape [16, 9, 3, 3]",
        ),
        (
            "qkv",
            Box::new(|sd: &mut StateDict| {
                let t = sd
                    .get_mut(
                        "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_bias",
                    )
                    .unwrap();
                t.shape[0] -= 1;
                t.data.truncate(t.data.len() - 4);
            }),
            "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_bias",
        ),
    ];
    for (name, edit, needle) in cases {
        let p = variant(d, name, edit);
        assert_fails(&p, &tiny_opts(), needle);
    }

    let (file, _) = single_file(&d.join("plain"));
    // Config folders: without text_encoder_2/, or with a layer count that does not fit.
    let cfg = d.join("cfg");
    for part in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        std::fs::create_dir_all(cfg.join(part)).unwrap();
        std::fs::copy(
            tiny().join(part).join("config.json"),
            cfg.join(part).join("config.json"),
        )
        .unwrap();
    }
    let opts = ToDiffusers {
        config: ConfigChoice::Dir(cfg.clone()),
        ..Default::default()
    };
    let mut t2 = json(&cfg.join("text_encoder_2/config.json"));
    t2["num_hidden_layers"] = 3.into();
    std::fs::write(
        cfg.join("text_encoder_2/config.json"),
        serde_json::to_vec(&t2).unwrap(),
    )
    .unwrap();
    assert_fails(&file, &opts, "has 4 resblocks");
    t2["num_hidden_layers"] = 4.into();
    t2["projection_dim"] = 24.into();
    std::fs::write(
        cfg.join("text_encoder_2/config.json"),
        serde_json::to_vec(&t2).unwrap(),
    )
    .unwrap();
    assert_fails(&file, &opts, "`projection_dim` is 24");
    let mut u = json(&cfg.join("unet/config.json"));
    u["addition_embed_type"] = serde_json::Value::Null;
    std::fs::write(
        cfg.join("unet/config.json"),
        serde_json::to_vec(&u).unwrap(),
    )
    .unwrap();
    assert_fails(&file, &opts, "label_emb.0.0");
    std::fs::remove_dir_all(cfg.join("text_encoder_2")).unwrap();
    assert_fails(&file, &opts, "no text_encoder_2/config.json");
}

/// Folders that cannot make an SDXL file are refused by name.
#[test]
fn sdxl_incomplete_folders_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("model");
    let (file, _) = single_file(tmp.path());
    convert_single_file_to_diffusers(&file, &folder, &tiny_opts()).unwrap();
    let out = tmp.path().join("out.safetensors");
    // text_encoder_2 without its projection (a CLIPTextModel).
    let p = folder.join("text_encoder_2/model.safetensors");
    let mut sd = read_safetensors(&p).unwrap();
    sd.remove("text_projection.weight");
    write_safetensors(&p, &sd).unwrap();
    let err = convert_diffusers_to_single_file(&folder, &out, &ToSingleFile::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no `text_projection.weight`"), "{err}");
    // No text_encoder_2/ at all, with an SDXL UNet.
    std::fs::remove_dir_all(folder.join("text_encoder_2")).unwrap();
    let err = convert_diffusers_to_single_file(&folder, &out, &ToSingleFile::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("SDXL UNet") && err.contains("no text_encoder_2/"),
        "{err}"
    );
    assert!(!out.exists());
}

/// decorr's loaders read the converted folder: both text encoders give bit for bit what the
/// original folder's give (hidden states and pooled embedding), and tokenizer_2 pads with "!".
#[test]
fn sdxl_converted_encoders_load_in_decorr() {
    use burn::tensor::Device;
    use decorr_core::ModelSource;
    let tmp = tempfile::tempdir().unwrap();
    let (file, _) = single_file(tmp.path());
    let out = tmp.path().join("model");
    convert_single_file_to_diffusers(&file, &out, &tiny_opts()).unwrap();
    let device = Device::flex();
    let ours = ModelSource::Local(out);
    let orig = ModelSource::Local(tiny());
    let tok = decorr_clip::load_tokenizer_component(&ours, "tokenizer_2").unwrap();
    let ids = tok.encode("a red cube on a table").unwrap();
    let tail = &ids.ids[ids.eos_index() + 1..];
    assert!(!tail.is_empty() && tail.iter().all(|&i| i == 0), "{tail:?}");
    let rows = [ids.ids.clone()];
    for component in ["text_encoder", "text_encoder_2"] {
        let a = decorr_clip::load_text_encoder_component(&ours, component, &device).unwrap();
        let b = decorr_clip::load_text_encoder_component(&orig, component, &device).unwrap();
        assert_eq!(a.config, b.config, "{component}");
        let x = a.model.sdxl_conditioning(&rows, 0).unwrap();
        let y = b.model.sdxl_conditioning(&rows, 0).unwrap();
        assert_eq!(x.hidden.into_data(), y.hidden.into_data(), "{component}");
        assert_eq!(
            x.text_embeds.map(|t| t.into_data()),
            y.text_embeds.map(|t| t.into_data()),
            "{component}"
        );
    }
}

/// An all-zero f32 tensor: name tables only need shapes where detection and checks read them.
fn zeros(shape: Vec<usize>) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor {
        dtype: DType::F32,
        shape,
        data: vec![0; n * 4],
    }
}

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

/// Every tensor name of full-size SDXL base (from the fixture script, checked there against
/// diffusers' converters, its `xl_base` inference and the official reverse script's names)
/// maps to diffusers' name with the embedded SDXL configs, picked by `auto` from the names and
/// widths; and back to the same names.
#[test]
fn sdxl_names_map_like_diffusers_with_auto_config() {
    let names = gz_json(&fixture("sdxl_names.json.gz"));
    let ignored: Vec<String> = names["ignored"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ignored, ["conditioner.embedders.1.model.logit_scale"]);
    let shape_of = |l: &str| match l {
        "model.diffusion_model.input_blocks.0.0.weight" => vec![320, 4, 1, 1],
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight" => {
            vec![1, 2048]
        }
        "model.diffusion_model.label_emb.0.0.weight" => vec![1, 2816],
        "first_stage_model.encoder.conv_in.weight" => vec![128, 1, 1, 1],
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" => vec![768],
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" => {
            vec![49408, 1]
        }
        "conditioner.embedders.1.model.ln_final.weight" => vec![1280],
        "conditioner.embedders.1.model.token_embedding.weight" => vec![49408, 1],
        "conditioner.embedders.1.model.text_projection" => vec![1280, 1280],
        "conditioner.embedders.1.model.logit_scale" => vec![],
        k if k.ends_with("attn.in_proj_weight") => vec![3, 1],
        k if k.ends_with("attn.in_proj_bias") => vec![3],
        k if k.contains("mid.attn_1.") && k.ends_with("weight") && !k.contains("norm") => {
            vec![1, 1, 1, 1]
        }
        _ => vec![1],
    };
    let parts = ["text_encoder", "text_encoder_2", "unet", "vae"];
    let mut sd = StateDict::new();
    for part in parts {
        for (l, _) in name_pairs(&names, part) {
            let shape = shape_of(&l);
            sd.insert(l, zeros(shape));
        }
    }
    for l in &ignored {
        sd.insert(l.clone(), zeros(shape_of(l)));
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("sdxl.safetensors");
    write_safetensors(&file, &sd).unwrap();
    let out = tmp.path().join("model");
    let s = convert_single_file_to_diffusers(&file, &out, &ToDiffusers::default()).unwrap();
    assert_eq!(s.ignored, 1);
    assert_eq!((s.text_encoder, s.text_encoder_2), (196, 517));
    for ((part, got), want_part) in models(&out).into_iter().zip(parts) {
        assert_eq!(part, want_part);
        let mut want: Vec<String> = name_pairs(&names, part)
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        want.sort();
        want.dedup();
        let got: Vec<String> = got.keys().cloned().collect();
        assert_eq!(got, want, "{part}");
    }
    let te2 = read_safetensors(&out.join("text_encoder_2/model.safetensors")).unwrap();
    assert_eq!(te2["text_projection.weight"].shape, vec![1280, 1280]);
    assert_eq!(
        te2["text_model.encoder.layers.31.self_attn.v_proj.weight"].shape,
        vec![1, 1]
    );
    // The embedded configs: SDXL base's, and decorr's own SDXL encoder presets.
    let unet_cfg = json(&out.join("unet/config.json"));
    assert_eq!(unet_cfg["cross_attention_dim"], 2048);
    assert_eq!(unet_cfg["addition_embed_type"], "text_time");
    assert_eq!(
        unet_cfg["transformer_layers_per_block"],
        serde_json::json!([1, 2, 10])
    );
    assert_eq!(
        json(&out.join("vae/config.json"))["scaling_factor"],
        0.13025
    );
    let sched = json(&out.join("scheduler/scheduler_config.json"));
    assert_eq!(sched["_class_name"], "EulerDiscreteScheduler");
    assert_eq!(sched["prediction_type"], "epsilon");
    assert_eq!(sched["timestep_spacing"], "leading");
    assert_eq!(
        json(&out.join("model_index.json")),
        json(&fixture("model_index.json"))
    );
    for (rel, preset) in [
        (
            "text_encoder/config.json",
            decorr_clip::ClipTextConfig::sdxl_text_encoder(),
        ),
        (
            "text_encoder_2/config.json",
            decorr_clip::ClipTextConfig::sdxl_text_encoder_2(),
        ),
    ] {
        let c: decorr_clip::ClipTextConfig = serde_json::from_value(json(&out.join(rel))).unwrap();
        assert_eq!(c, {
            let mut p = preset;
            p.extra = c.extra.clone();
            p
        });
        assert_eq!(c.has_projection(), rel.starts_with("text_encoder_2"));
    }

    // And back: the same LDM names, less logit_scale, plus CLIP's position_ids buffer.
    let single = tmp.path().join("back.safetensors");
    convert_diffusers_to_single_file(&out, &single, &ToSingleFile::default()).unwrap();
    let back = read_safetensors(&single).unwrap();
    let pos = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids".to_string();
    let mut want: Vec<&String> = sd.keys().filter(|k| !ignored.contains(k)).collect();
    want.push(&pos);
    want.sort();
    assert_eq!(back.keys().collect::<Vec<_>>(), want);

    // v-prediction fine-tunes: the scheduler's prediction_type is overridden.
    let v = tmp.path().join("v");
    let opts = ToDiffusers {
        prediction: Some(decorr_convert::Prediction::VPrediction),
        ..Default::default()
    };
    convert_single_file_to_diffusers(&file, &v, &opts).unwrap();
    let sched = json(&v.join("scheduler/scheduler_config.json"));
    assert_eq!(sched["prediction_type"], "v_prediction");
    assert_eq!(sched["_class_name"], "EulerDiscreteScheduler");
    assert_eq!(
        json(&v.join("model_index.json"))["scheduler"][1],
        "EulerDiscreteScheduler"
    );
}
