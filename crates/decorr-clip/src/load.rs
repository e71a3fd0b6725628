//! Loading and saving a checkpoint's text side: `text_encoder/config.json` + safetensors weights
//! (fp32 or fp16, keys with or without transformers' `text_model.` prefix) and `tokenizer/`, or
//! SDXL's second pair, `text_encoder_2/` (with its `text_projection`) and `tokenizer_2/` (padding
//! with `!`), through the `_component` functions. Saved encoders use transformers' naming, so
//! `CLIPTextModel` / `CLIPTextModelWithProjection.from_pretrained` and diffusers load them.

use std::io::Read;
use std::path::Path;

use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, SafetensorsStore};
use burn::tensor::Device;
use decorr_core::weights::{KeyMap, load_safetensors, read_json};
use decorr_core::{ModelFile, ModelSource};

use crate::{ClipError, ClipTextConfig, ClipTextModel, ClipTokenizer};

/// Weight files tried in order inside `text_encoder/`.
pub const WEIGHT_FILES: &[&str] = &["model.safetensors", "model.fp16.safetensors"];

/// transformers' key of `CLIPTextModelWithProjection`'s projection: top level, beside (not
/// under) `text_model.`, in every file transformers writes.
pub const PROJECTION_KEY: &str = "text_projection.weight";

/// File keys → module paths: real SD files prefix `text_model.`, transformers 5 does not.
const KEYS: KeyMap<'static> = KeyMap {
    remap: &[(r"^text_model\.", "")],
    ignore: &[r"(^|\.)position_ids$"],
    file_names: &[],
};

/// A loaded text encoder and where it came from.
#[derive(Debug)]
pub struct TextEncoder {
    pub config: ClipTextConfig,
    pub model: ClipTextModel,
    /// Where the config and the weights were read (on disk, or in memory).
    pub config_path: ModelFile,
    pub weights_path: ModelFile,
}

/// Load `text_encoder/` of `source` onto `device`.
pub fn load_text_encoder(source: &ModelSource, device: &Device) -> Result<TextEncoder, ClipError> {
    load_text_encoder_component(source, "text_encoder", device)
}

/// Load the text encoder in folder `component` of `source` (`text_encoder`, or SDXL's
/// `text_encoder_2`) onto `device`. The projection is loaded when the config names
/// `CLIPTextModelWithProjection` (then the file must hold it) or the file holds
/// [`PROJECTION_KEY`] (then the returned config names it too).
pub fn load_text_encoder_component(
    source: &ModelSource,
    component: &str,
    device: &Device,
) -> Result<TextEncoder, ClipError> {
    let config_path = source.find_file(component, &["config.json"])?;
    let weights_path = source.find_file(component, WEIGHT_FILES)?;
    load_files(config_path, weights_path, device)
}

/// Load a text encoder from a folder that holds `config.json` and the weights directly (what
/// `decorr finetune` writes to `OUT/text_encoder`, or a transformers `save_pretrained` folder).
pub fn load_text_encoder_dir(dir: &Path, device: &Device) -> Result<TextEncoder, ClipError> {
    // "There" rather than "a file": a FIFO or a device is refused by name when read.
    let there = |p: &Path| decorr_core::input::exists_at_all(p);
    let config_path = dir.join("config.json");
    let weights_path = WEIGHT_FILES.iter().map(|f| dir.join(f)).find(|p| there(p));
    match (there(&config_path), weights_path) {
        (true, Some(weights_path)) => load_files(
            ModelFile::Path(config_path),
            ModelFile::Path(weights_path),
            device,
        ),
        _ => Err(decorr_core::CoreError::NotFound(format!(
            "{} is not a text-encoder folder: it needs config.json and one of {}",
            dir.display(),
            WEIGHT_FILES.join(", ")
        ))
        .into()),
    }
}

fn load_files(
    config_path: ModelFile,
    weights_path: ModelFile,
    device: &Device,
) -> Result<TextEncoder, ClipError> {
    let mut config: ClipTextConfig = read_json(&config_path, "a CLIP text-encoder config")?;
    if !config.has_projection() && has_tensor(&weights_path, PROJECTION_KEY) {
        // A projection in the file is part of the encoder whatever the config's class says
        // (a hand-written `text_encoder_2/config.json` may name none): keep it, not refuse it.
        config = config.with_projection(true);
    }
    config.validate().map_err(|e| match e {
        ClipError::Config(m) => ClipError::Config(format!("{config_path}: {m}")),
        other => other,
    })?;
    let params = config.num_params();
    decorr_core::limits::check_memory(
        params * 4,
        &format!("the text encoder of {config_path} ({params} parameters, f32)"),
        "check its vocab_size, hidden_size, intermediate_size and num_hidden_layers",
    )?;
    let mut model = ClipTextModel::new(&config, device);
    load_safetensors(&mut model, &weights_path, &KEYS)?;
    Ok(TextEncoder {
        config,
        model,
        config_path,
        weights_path,
    })
}

/// Whether the safetensors `file` lists a tensor `name` in its header (read alone, not the
/// data). A file that cannot be read says no: loading it reports the problem by name.
fn has_tensor(file: &ModelFile, name: &str) -> bool {
    /// safetensors' own limit on a header.
    const HEADER_CAP: u64 = 100 << 20;
    let header = match file {
        ModelFile::Path(p) => (|| {
            let mut f = decorr_core::input::open(p, "a weights file").ok()?;
            let mut len = [0u8; 8];
            f.read_exact(&mut len).ok()?;
            let n = u64::from_le_bytes(len);
            let mut buf = Vec::new();
            f.take(n.min(HEADER_CAP)).read_to_end(&mut buf).ok()?;
            Some(buf)
        })(),
        ModelFile::Memory { bytes, .. } => (|| {
            let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?).min(HEADER_CAP);
            Some(bytes.get(8..8 + usize::try_from(n).ok()?)?.to_vec())
        })(),
    };
    header
        .and_then(|h| serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&h).ok())
        .is_some_and(|h| h.contains_key(name))
}

/// The checkpoint's own `tokenizer/` if it has one, else the embedded CLIP vocabulary (the
/// same one every SD 1.x/2.x checkpoint ships), padding with the pad token its config names.
/// A `tokenizer/` missing `vocab.json` or `merges.txt` is an error, not a fallback.
pub fn load_tokenizer(source: &ModelSource) -> Result<ClipTokenizer, ClipError> {
    load_tokenizer_component(source, "tokenizer")
}

/// The tokenizer in folder `component` of `source` (`tokenizer`, or SDXL's `tokenizer_2`,
/// whose `!` pad token, id 0, fills the sequence after EOS as transformers' `CLIPTokenizer`
/// does). Only `tokenizer` falls back to the embedded vocabulary when the folder is absent:
/// another one missing is an error, since its padding would be guessed.
pub fn load_tokenizer_component(
    source: &ModelSource,
    component: &str,
) -> Result<ClipTokenizer, ClipError> {
    let tok = load_vocabulary(source, component)?;
    match pad_token(source, component)? {
        Some(pad) => tok.with_pad_token(&pad),
        None => Ok(tok),
    }
}

/// The `pad_token` of `COMPONENT/special_tokens_map.json` or `tokenizer_config.json` (SD 2's
/// and SDXL `tokenizer_2`'s `!`; SD 1.x names EOS), as a string or as transformers'
/// `{"content": ...}` form.
fn pad_token(source: &ModelSource, component: &str) -> Result<Option<String>, ClipError> {
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let Some(f) = source.find_file_opt(component, &[name])? else {
            continue;
        };
        let text = read_text(&f)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ClipError::Tokenizer(format!("{f} is not valid JSON: {e}")))?;
        let pad = match &v["pad_token"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => {
                o.get("content").and_then(|c| c.as_str()).map(String::from)
            }
            _ => None,
        };
        if pad.is_some() {
            return Ok(pad);
        }
    }
    Ok(None)
}

/// A tokenizer file's text (CoreError says "cannot read {file}: {reason}", on disk or in memory).
fn read_text(f: &ModelFile) -> Result<String, ClipError> {
    f.read_to_string()
        .map_err(|e| ClipError::Tokenizer(e.to_string()))
}

/// The vocabulary: `vocab.json` + `merges.txt`, `tokenizer.json`, or, only where the checkpoint
/// has no `tokenizer/` at all, the embedded one (with a note on stderr). A partial folder is an
/// error naming the missing file: a checkpoint's own vocabulary may add tokens, and tokenizing
/// with another one would quietly give wrong ids.
fn load_vocabulary(source: &ModelSource, component: &str) -> Result<ClipTokenizer, ClipError> {
    let find = |name: &str| source.find_file_opt(component, &[name]);
    let (vocab, merges) = (find("vocab.json")?, find("merges.txt")?);
    // Looked up only when needed: on the hub each look-up may be a request.
    let json = match (&vocab, &merges) {
        (Some(_), Some(_)) => None,
        _ => find("tokenizer.json")?,
    };
    match (vocab, merges, json) {
        (Some(v), Some(m), _) => ClipTokenizer::from_vocab_merges(&read_text(&v)?, &read_text(&m)?)
            .map_err(|e| ClipError::Tokenizer(format!("{v} and {m}: {}", strip_prefix(&e)))),
        (_, _, Some(f)) => ClipTokenizer::from_tokenizer_json_str(&read_text(&f)?, &f.to_string()),
        (Some(v), None, None) => Err(ClipError::Tokenizer(crate::tokenizer::partial(
            &folder_of(&v),
            "vocab.json",
            "merges.txt",
        ))),
        (None, Some(m), None) => Err(ClipError::Tokenizer(crate::tokenizer::partial(
            &folder_of(&m),
            "merges.txt",
            "vocab.json",
        ))),
        (None, None, None) if source.has_folder(component) => Err(ClipError::Tokenizer(format!(
            "the {component}/ folder of {} holds neither vocab.json + merges.txt nor \
                 tokenizer.json; copy the checkpoint's whole {component}/ folder{}",
            source.describe(),
            if component == "tokenizer" {
                ", or remove the empty one to use the embedded CLIP vocabulary"
            } else {
                ""
            }
        ))),
        (None, None, None) if component != "tokenizer" => Err(ClipError::Tokenizer(format!(
            "{} has no {component}/ folder (vocab.json + merges.txt, or tokenizer.json, with \
             its special_tokens_map.json): copy the checkpoint's {component}/ folder; the \
             embedded vocabulary stands in only for tokenizer/, since this one's padding \
             (SDXL's tokenizer_2 pads with \"!\") would be a guess",
            source.describe()
        ))),
        (None, None, None) => {
            note_embedded(source);
            Ok(ClipTokenizer::embedded())
        }
    }
}

/// A tokenizer error's text without the `tokenizer: ` its Display adds (it is wrapped again).
fn strip_prefix(e: &ClipError) -> String {
    match e {
        ClipError::Tokenizer(m) => m.clone(),
        other => other.to_string(),
    }
}

/// The folder holding `f` (`WEIGHTS/tokenizer`), for messages.
fn folder_of(f: &ModelFile) -> String {
    let name = f.to_string();
    match name.rsplit_once(['/', ' ']) {
        Some((dir, _)) if !dir.is_empty() => dir.to_string(),
        _ => name,
    }
}

/// Says once per checkpoint, at the default log level, that the embedded vocabulary stands in
/// for a missing `tokenizer/` (a checkpoint with added tokens would need its own).
fn note_embedded(source: &ModelSource) {
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let what = source.describe();
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if !said.contains(&what) {
        eprintln!(
            "note: no tokenizer/ in {what}; using the embedded CLIP vocabulary (the one SD 1.x \
             and 2.x checkpoints ship)"
        );
        said.push(what);
    }
}

/// Write `model` and `config` as a transformers `CLIPTextModel` folder (`config.json`,
/// `model.safetensors` with SD 1.5's `text_model.` keys, fp32), or, for a model with a
/// projection, a `CLIPTextModelWithProjection` one (`text_projection.weight` beside
/// `text_model.`, as transformers writes it). Each file is written atomically.
pub fn save_text_encoder(
    model: &ClipTextModel,
    config: &ClipTextConfig,
    dir: &Path,
) -> Result<(), ClipError> {
    let io = |source| decorr_core::CoreError::Write {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let weights = dir.join("model.safetensors");
    let mut store = SafetensorsStore::from_file(&weights)
        .with_to_adapter(BurnToPyTorchAdapter)
        .with_key_remapping("^", "text_model.")
        // Patterns apply in order: the projection comes back out from under `text_model.`.
        .with_key_remapping(r"^text_model\.text_projection\.", "text_projection.")
        .metadata("format", "pt")
        .overwrite(true);
    model
        .save_into(&mut store)
        .map_err(|e| decorr_core::CoreError::BadSafetensors {
            path: weights.clone(),
            message: format!("cannot write: {e}"),
        })?;
    decorr_core::io::make_readable(&weights)?;
    // The class follows the weights written, so transformers builds what the file holds.
    let mut config = config
        .clone()
        .with_projection(model.text_projection.is_some());
    if let Some(p) = &model.text_projection {
        config.projection_dim = p.weight.dims()[1];
    }
    let cfg = serde_json::to_value(&config).expect("configs serialize");
    let text = serde_json::to_string_pretty(&cfg).expect("JSON values serialize");
    decorr_core::io::write_atomic(&dir.join("config.json"), text.as_bytes())?;
    Ok(())
}
