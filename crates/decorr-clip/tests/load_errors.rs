//! Loading a text encoder that does not fit its files fails with an error that names the tensor
//! (or key) and the file, never a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use decorr_clip::load_text_encoder;
use decorr_core::ModelSource;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/clip_tiny_b/text_encoder")
}

/// A copy of `clip_tiny_b` whose config and tensors `edit` may change.
fn variant(
    edit_config: impl FnOnce(&mut serde_json::Value),
    edit_tensors: impl FnOnce(&mut HashMap<String, (Vec<usize>, Vec<u8>)>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let te = dir.path().join("text_encoder");
    std::fs::create_dir_all(&te).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap())
            .unwrap();
    edit_config(&mut cfg);
    std::fs::write(te.join("config.json"), cfg.to_string()).unwrap();
    let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: HashMap<String, (Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit_tensors(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, (shape, data))| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &te.join("model.safetensors")).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    match load_text_encoder(&ModelSource::Local(dir.to_path_buf()), &Device::flex()) {
        Ok(_) => panic!("loading should fail"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unmodified_copy_loads() {
    let dir = variant(|_| {}, |_| {});
    load_text_encoder(
        &ModelSource::Local(dir.path().to_path_buf()),
        &Device::flex(),
    )
    .unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let dir = variant(
        |_| {},
        |t| {
            t.remove("encoder.layers.1.self_attn.k_proj.weight");
        },
    );
    let e = load_err(dir.path());
    assert!(
        e.contains("encoder.layers.1.self_attn.k_proj.weight") && e.contains("missing"),
        "{e}"
    );
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = variant(
        |_| {},
        |t| {
            // CLIPModel's image-side projection: no part of a text encoder.
            t.insert("visual_projection.weight".into(), (vec![2], vec![0u8; 8]));
            // Known buffers of older files are ignored, not reported.
            t.insert("embeddings.position_ids".into(), (vec![2], vec![0u8; 8]));
        },
    );
    let e = load_err(dir.path());
    assert!(
        e.contains("visual_projection.weight") && e.contains("not part of the model"),
        "{e}"
    );
    assert!(!e.contains("position_ids"), "{e}");
}

/// A `text_projection.weight` in the file makes the encoder a `CLIPTextModelWithProjection`
/// even where the config names `CLIPTextModel`: loaded, and its shape checked against
/// `projection_dim` like any tensor.
#[test]
fn projection_in_the_file_is_loaded_and_checked() {
    let f32s = |n: usize| vec![0u8; 4 * n];
    // clip_tiny_b: hidden 48, projection_dim 48; transformers' [projection_dim, hidden].
    let dir = variant(
        |c| c["projection_dim"] = 8.into(),
        |t| {
            t.insert("text_projection.weight".into(), (vec![8, 48], f32s(8 * 48)));
        },
    );
    let enc = load_text_encoder(
        &ModelSource::Local(dir.path().to_path_buf()),
        &Device::flex(),
    )
    .unwrap();
    assert!(enc.config.has_projection());
    assert_eq!(
        enc.model.text_projection.as_ref().unwrap().weight.dims(),
        [48, 8]
    );

    let dir = variant(
        |_| {},
        |t| {
            t.insert("text_projection.weight".into(), (vec![8, 48], f32s(8 * 48)));
        },
    );
    let e = load_err(dir.path());
    assert!(
        e.contains("text_projection.weight") && e.contains("shape") && e.contains("48"),
        "{e}"
    );
}

/// A config naming `CLIPTextModelWithProjection` needs the projection in the file.
#[test]
fn projection_named_by_the_config_must_be_in_the_file() {
    let dir = variant(
        |c| c["architectures"] = serde_json::json!(["CLIPTextModelWithProjection"]),
        |_| {},
    );
    let e = load_err(dir.path());
    assert!(
        e.contains("text_projection.weight") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn misshaped_tensor_is_named_with_both_shapes() {
    let dir = variant(|c| c["intermediate_size"] = 65.into(), |_| {});
    let e = load_err(dir.path());
    assert!(e.contains("mlp.fc1.weight") && e.contains("shape"), "{e}");
    assert!(e.contains("65") && e.contains("64"), "{e}");
}

#[test]
fn config_with_more_layers_than_the_file_names_the_missing_layer() {
    let dir = variant(|c| c["num_hidden_layers"] = 3.into(), |_| {});
    let e = load_err(dir.path());
    assert!(e.contains("encoder.layers.2."), "{e}");
}

#[test]
fn corrupt_files_name_the_file() {
    let dir = variant(|_| {}, |_| {});
    let te = dir.path().join("text_encoder");
    std::fs::write(te.join("model.safetensors"), b"not a safetensors file").unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(te.join("config.json"), b"{ broken").unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("config.json") && e.contains("not valid JSON"),
        "{e}"
    );
    std::fs::write(
        te.join("config.json"),
        br#"{"hidden_size": 48, "num_attention_heads": 5}"#,
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("divisible"), "{e}");
}

#[test]
fn non_finite_weight_is_refused_naming_tensor_and_file() {
    let dir = variant(
        |_| {},
        |t| {
            // clip_tiny_b's keys carry no `text_model.` prefix.
            let (_, data) = t.get_mut("encoder.layers.1.mlp.fc1.weight").unwrap();
            data[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        },
    );
    let err = load_err(dir.path());
    assert!(
        err.contains("encoder.layers.1.mlp.fc1.weight")
            && err.contains("model.safetensors")
            && err.contains("non-finite"),
        "{err}"
    );
}

#[test]
fn absurd_layer_count_is_one_short_error_naming_the_key() {
    // Before validation, 100000 layers listed 1.6 million missing tensors.
    let dir = variant(|c| c["num_hidden_layers"] = 100_000.into(), |_| {});
    let err = load_err(dir.path());
    assert!(
        err.contains("`num_hidden_layers` = 100000")
            && err.contains("1..=256")
            && err.contains("text_encoder/config.json"),
        "{err}"
    );
    assert!(err.lines().count() < 5, "{err}");
    let dir = variant(|c| c["layer_norm_eps"] = (-1.0).into(), |_| {});
    assert!(load_err(dir.path()).contains("`layer_norm_eps` = -1"));
}
