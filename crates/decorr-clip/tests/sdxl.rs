//! SDXL's two text encoders against transformers and diffusers, on the tiny random SDXL model of
//! `tests/fixtures/sdxl_tiny/` loaded through the crate's loaders, with the fixtures that
//! `tests/pyref/make_sdxl_clip_fixtures.py` wrote to `tests/fixtures/sdxl_clip/`: both
//! tokenizers' ids, every layer's attention probabilities, `hidden_states[-2]` and `[-3]` (clip
//! skip 1), the last hidden state, encoder 2's pooled `text_embeds`, diffusers'
//! `encode_prompt` outputs, a save/load round trip of encoder 2, and the full-size presets'
//! parameter counts.
//!
//! Tolerance (fp32): max abs error <= 1e-5 for attention probabilities, hidden states and
//! pooled embeddings alike (`TOL`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{Int, Tensor, TensorData};
use decorr_clip::{
    ClipTextConfig, ClipTokenizer, ForwardOptions, TextEncoder, load_text_encoder,
    load_text_encoder_component, load_text_encoder_dir, load_tokenizer, load_tokenizer_component,
    save_text_encoder,
};
use decorr_core::ModelSource;

const TOL: f32 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn source() -> ModelSource {
    ModelSource::Local(fixtures().join("sdxl_tiny"))
}

/// A reference tensor: shape and values (floats as f32, ids as i64).
struct RefTensor {
    shape: Vec<usize>,
    f32s: Vec<f32>,
    i64s: Vec<i64>,
}

fn reference() -> HashMap<String, RefTensor> {
    let path = fixtures().join("sdxl_clip/reference.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let (f32s, i64s) = match view.dtype() {
                safetensors::Dtype::F32 => (
                    data.chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                    vec![],
                ),
                safetensors::Dtype::I64 => (
                    vec![],
                    data.chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                ),
                other => panic!("unexpected dtype {other:?} for {name}"),
            };
            let shape = view.shape().to_vec();
            (name, RefTensor { shape, f32s, i64s })
        })
        .collect()
}

#[derive(serde::Deserialize)]
struct TokenRow {
    prompt: String,
    tokenizer: Vec<u32>,
    tokenizer_2: Vec<u32>,
    pool_2: usize,
}

#[derive(serde::Deserialize)]
struct Tokens {
    encoder_prompts: usize,
    param_counts: HashMap<String, u128>,
    prompts: Vec<TokenRow>,
}

fn tokens() -> Tokens {
    let text = std::fs::read_to_string(fixtures().join("sdxl_clip/tokens.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn max_abs_diff<const D: usize>(ours: Tensor<D>, reference: &RefTensor) -> f32 {
    assert_eq!(ours.dims().to_vec(), reference.shape, "shape");
    let ours = ours
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap();
    assert_eq!(ours.len(), reference.f32s.len());
    ours.iter()
        .zip(&reference.f32s)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

/// `name`'s difference, printed and held to [`TOL`].
fn check<const D: usize>(ours: Tensor<D>, reference: &HashMap<String, RefTensor>, name: &str) {
    let diff = max_abs_diff(ours, &reference[name]);
    println!("{name}: max abs diff {diff:.2e}");
    assert!(diff <= TOL, "{name} differs by {diff} > {TOL}");
}

fn encoder(component: &str) -> TextEncoder {
    let device = decorr_core::device_from_env();
    load_text_encoder_component(&source(), component, &device).unwrap()
}

fn ids_tensor(r: &RefTensor) -> Tensor<2, Int> {
    let device = decorr_core::device_from_env();
    Tensor::from_data(TensorData::new(r.i64s.clone(), r.shape.clone()), &device)
}

fn ids_rows(r: &RefTensor) -> Vec<Vec<u32>> {
    r.i64s
        .chunks(r.shape[1])
        .map(|row| row.iter().map(|&i| i as u32).collect())
        .collect()
}

/// Every layer's attention, `hidden_states[-2]` and the last hidden state of encoder `prefix`
/// (`te1`, `te2`), and for encoder 2 `pooler_output` and `text_embeds`; then `[-3]`.
fn check_encoder(enc: &TextEncoder, prefix: &str) {
    let reference = reference();
    let ids = &reference[&format!("{prefix}.input_ids")];
    let n = enc.model.num_layers();
    let pool_at: Vec<usize> = ids_rows(ids)
        .iter()
        .map(|row| enc.model.pooling_position(row))
        .collect();
    let opts = ForwardOptions {
        attention_layers: (0..n).collect(),
        hidden_state_at: Some(n - 1),
        pool_at: Some(pool_at),
        ..Default::default()
    };
    let out = enc.model.forward_with(ids_tensor(ids), &opts);
    assert_eq!(out.attentions.len(), n);
    for (i, a) in out.attentions {
        check(a, &reference, &format!("{prefix}.attentions.{i}"));
    }
    let name = |s: &str| format!("{prefix}.{s}");
    check(
        out.hidden_state.unwrap(),
        &reference,
        &name("hidden_states.-2"),
    );
    check(
        out.last_hidden_state.unwrap(),
        &reference,
        &name("last_hidden_state"),
    );
    match out.text_embeds {
        Some(t) => {
            check(out.pooled.unwrap(), &reference, &name("pooler_output"));
            check(t, &reference, &name("text_embeds"));
        }
        None => assert!(!reference.contains_key(&name("text_embeds"))),
    }
    let skip = ForwardOptions {
        hidden_state_at: Some(n - 2),
        stop_at_hidden_state: true,
        ..Default::default()
    };
    let out = enc.model.forward_with(ids_tensor(ids), &skip);
    assert!(out.last_hidden_state.is_none());
    check(
        out.hidden_state.unwrap(),
        &reference,
        &name("hidden_states.-3"),
    );
}

#[test]
fn encoder_1_matches_transformers() {
    let enc = load_text_encoder(&source(), &decorr_core::device_from_env()).unwrap();
    assert!(enc.model.text_projection.is_none() && !enc.config.has_projection());
    check_encoder(&enc, "te1");
}

/// CLIPTextModelWithProjection: width 24, 3 heads, gelu, non-square projection 24 -> 20.
#[test]
fn encoder_2_matches_transformers_with_pooled_text_embeds() {
    let enc = encoder("text_encoder_2");
    assert!(enc.config.has_projection());
    let projection = enc.model.text_projection.as_ref().unwrap();
    assert_eq!(projection.weight.dims(), [24, 20]);
    assert!(projection.bias.is_none());
    check_encoder(&enc, "te2");
}

/// Both tokenizers as transformers' CLIPTokenizer gives them: tokenizer pads with EOS,
/// tokenizer_2 with "!" (id 0); and encoder 2's pooling position is transformers'.
#[test]
fn tokenizers_and_pooling_positions_match_transformers() {
    let tok1 = load_tokenizer(&source()).unwrap();
    let tok2 = load_tokenizer_component(&source(), "tokenizer_2").unwrap();
    assert_eq!(tok1.pad_id(), tok1.eos_id());
    assert_eq!(tok2.pad_id(), 0);
    let config = encoder("text_encoder_2").config;
    let rows = tokens().prompts;
    assert!(rows.len() >= 6);
    assert!(
        rows.iter()
            .any(|r| r.prompt == "rusty tracks with an old train")
    );
    for r in rows {
        assert_eq!(
            tok1.encode(&r.prompt).unwrap().ids,
            r.tokenizer,
            "{:?}",
            r.prompt
        );
        let ids2 = tok2.encode(&r.prompt).unwrap().ids;
        assert_eq!(ids2, r.tokenizer_2, "tokenizer_2 ids of {:?}", r.prompt);
        assert_eq!(config.pooling_position(&ids2), r.pool_2, "{:?}", r.prompt);
    }
}

/// No silent stand-in for a missing tokenizer_2/: its padding would be a guess.
#[test]
fn missing_tokenizer_2_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_tokenizer_component(&ModelSource::Local(dir.path().into()), "tokenizer_2")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no tokenizer_2/ folder") && e.contains("copy"),
        "{e}"
    );
}

/// `sdxl_conditioning` of both encoders, from this crate's own tokenizers, is diffusers'
/// `encode_prompt`: the penultimate states side by side and encoder 2's `text_embeds`; with
/// clip skip 1 too.
#[test]
fn sdxl_conditioning_matches_diffusers_encode_prompt() {
    let (enc1, enc2) = (encoder("text_encoder"), encoder("text_encoder_2"));
    let tok1 = load_tokenizer(&source()).unwrap();
    let tok2 = load_tokenizer_component(&source(), "tokenizer_2").unwrap();
    let t = tokens();
    let prompts: Vec<&str> = t.prompts[..t.encoder_prompts]
        .iter()
        .map(|r| r.prompt.as_str())
        .collect();
    let ids = |tok: &ClipTokenizer| -> Vec<Vec<u32>> {
        prompts.iter().map(|p| tok.encode(p).unwrap().ids).collect()
    };
    let (ids1, ids2) = (ids(&tok1), ids(&tok2));
    let reference = reference();
    for (skip, suffix) in [(0, ""), (1, ".clip_skip_1")] {
        let c1 = enc1.model.sdxl_conditioning(&ids1, skip).unwrap();
        let c2 = enc2.model.sdxl_conditioning(&ids2, skip).unwrap();
        assert!(c1.text_embeds.is_none());
        let context = Tensor::cat(vec![c1.hidden, c2.hidden], 2);
        check(context, &reference, &format!("prompt_embeds{suffix}"));
        check(
            c2.text_embeds.unwrap(),
            &reference,
            &format!("pooled_prompt_embeds{suffix}"),
        );
    }
}

/// Encoder 1's conditioning does not run its last layer or final norm: poisoning them with NaN
/// changes nothing.
#[test]
fn encoder_1_conditioning_skips_the_last_layer() {
    let mut enc = encoder("text_encoder");
    let ids = vec![tokens().prompts[0].tokenizer.clone()];
    let before = enc.model.sdxl_conditioning(&ids, 0).unwrap().hidden;
    let last = enc.model.num_layers() - 1;
    let layer = &mut enc.model.encoder.layers[last];
    let w = layer.mlp.fc2.weight.val();
    layer.mlp.fc2.weight = Param::from_tensor(w.mul_scalar(f32::NAN));
    let g = enc.model.final_layer_norm.gamma.val();
    enc.model.final_layer_norm.gamma = Param::from_tensor(g.mul_scalar(f32::NAN));
    let after = enc.model.sdxl_conditioning(&ids, 0).unwrap().hidden;
    let diff = (after - before).abs().max().into_scalar::<f32>();
    assert_eq!(diff, 0.0);
}

/// Bad requests are errors naming the problem, not panics.
#[test]
fn bad_requests_are_errors() {
    let enc = encoder("text_encoder_2");
    let row = tokens().prompts[0].tokenizer_2.clone();
    let err = |ids: &[Vec<u32>], skip| {
        enc.model
            .sdxl_conditioning(ids, skip)
            .unwrap_err()
            .to_string()
    };
    assert!(err(&[], 0).contains("empty"));
    assert!(err(&[row.clone(), row[..10].to_vec()], 0).contains("rows of 77 and 10 ids"));
    assert!(err(std::slice::from_ref(&row), 4).contains("clip skip 4 is too large"));
    assert!(err(&[vec![49406, 60000, 49407]], 0).contains("token id 60000"));
    assert!(err(&[vec![0; 78]], 0).contains("78 tokens"));

    let check = |opts: ForwardOptions| opts.check(&enc.model, 2, 77).unwrap_err().to_string();
    let pooled = |p: Vec<usize>| ForwardOptions {
        pool_at: Some(p),
        ..Default::default()
    };
    assert!(check(pooled(vec![3])).contains("1 pooling positions for a batch of 2"));
    assert!(check(pooled(vec![3, 77])).contains("position 77 is outside"));
    let e = check(ForwardOptions {
        stop_at_attention: Some(1),
        ..pooled(vec![3, 4])
    });
    assert!(e.contains("pooling needs the last hidden state"), "{e}");
    let e = check(ForwardOptions {
        hidden_state_at: Some(5),
        ..Default::default()
    });
    assert!(e.contains("hidden state 5 does not exist"), "{e}");
    let e = check(ForwardOptions {
        stop_at_hidden_state: true,
        ..Default::default()
    });
    assert!(e.contains("needs hidden_state_at"), "{e}");
    let e = check(ForwardOptions {
        attention_layers: vec![3],
        hidden_state_at: Some(2),
        stop_at_hidden_state: true,
        ..Default::default()
    });
    assert!(e.contains("attention of layer 3"), "{e}");
    assert!(check(ForwardOptions::attention(&[4])).contains("layer 4 out of range"));
}

/// The tensors of a safetensors file: name -> (dtype, shape).
fn layout(path: &Path) -> HashMap<String, (String, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, (format!("{:?}", v.dtype()), v.shape().to_vec())))
        .collect()
}

/// Encoder 2 saved and reloaded keeps `text_projection`: the file has the layout transformers'
/// `CLIPTextModelWithProjection.save_pretrained` gave the fixture (same keys, shapes, fp32), the
/// config names that class, and the reload gives the same outputs. With
/// `DECORR_SDXL_SAVED=DIR` the folder is also written to DIR, for
/// `make_sdxl_clip_fixtures.py --check-saved DIR` (transformers loading it).
#[test]
fn encoder_2_save_load_round_trip_keeps_the_projection() {
    let device = decorr_core::device_from_env();
    let enc = encoder("text_encoder_2");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("text_encoder_2");
    save_text_encoder(&enc.model, &enc.config, &dir).unwrap();
    if let Ok(keep) = std::env::var("DECORR_SDXL_SAVED") {
        save_text_encoder(&enc.model, &enc.config, Path::new(&keep)).unwrap();
    }
    let fixture = fixtures().join("sdxl_tiny/text_encoder_2/model.safetensors");
    assert_eq!(layout(&dir.join("model.safetensors")), layout(&fixture));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["architectures"],
        serde_json::json!(["CLIPTextModelWithProjection"])
    );
    assert_eq!(cfg["projection_dim"], 20);

    let back = load_text_encoder_dir(&dir, &device).unwrap();
    assert!(back.config.has_projection());
    let reference = reference();
    let ids = ids_rows(&reference["te2.input_ids"]);
    let a = enc.model.sdxl_conditioning(&ids, 0).unwrap();
    let b = back.model.sdxl_conditioning(&ids, 0).unwrap();
    let diff = (a.text_embeds.unwrap() - b.text_embeds.unwrap())
        .abs()
        .max()
        .into_scalar::<f32>();
    assert_eq!(diff, 0.0);
    let diff = (a.hidden - b.hidden).abs().max().into_scalar::<f32>();
    assert_eq!(diff, 0.0);

    // Encoder 1 stays a plain CLIPTextModel: no projection written.
    let enc1 = encoder("text_encoder");
    let dir1 = tmp.path().join("text_encoder");
    save_text_encoder(&enc1.model, &enc1.config, &dir1).unwrap();
    let keys = layout(&dir1.join("model.safetensors"));
    assert!(
        keys.keys().all(|k| k.starts_with("text_model.")),
        "{keys:?}"
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir1.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"], serde_json::json!(["CLIPTextModel"]));
    assert!(
        load_text_encoder_dir(&dir1, &device)
            .unwrap()
            .model
            .text_projection
            .is_none()
    );
}

/// The full-size presets' parameter counts are transformers' (meta-device build in the fixture
/// script): 123,060,480 and 694,659,840.
#[test]
fn sdxl_presets_have_transformers_parameter_counts() {
    let counts = tokens().param_counts;
    assert_eq!(counts.len(), 2);
    for (name, want) in counts {
        let config = ClipTextConfig::preset(&name).unwrap();
        assert_eq!(config.num_params(), want, "{name}");
    }
    assert_eq!(
        ClipTextConfig::preset("sdxl-text-encoder-2")
            .unwrap()
            .num_params(),
        694_659_840
    );
}
