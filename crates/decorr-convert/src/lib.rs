//! Conversion between single-file Stable Diffusion checkpoints in the original LDM naming
//! (`model.safetensors` or a PyTorch `.ckpt`) and diffusers-layout folders.
//!
//! - [`convert_single_file_to_diffusers`] turns `cond_stage_model.transformer.*` (SD 1.x,
//!   OpenAI CLIP) or `cond_stage_model.model.*` (SD 2.x, OpenCLIP ViT-H),
//!   `model.diffusion_model.*` and `first_stage_model.*` tensors into `text_encoder/`,
//!   `unet/` and `vae/` with configs, plus `scheduler/`, `tokenizer/` and `model_index.json`.
//!   SDXL files (generative-models naming: `conditioner.embedders.0.transformer.*`, CLIP ViT-L,
//!   and `conditioner.embedders.1.model.*`, OpenCLIP bigG) also get `text_encoder_2/` and
//!   `tokenizer_2/`. The family is read from the tensor names, never from a flag.
//!   The names follow diffusers' own converter (`single_file_utils.py`), see [`mapping`].
//! - [`convert_diffusers_to_single_file`] does the reverse, LDM names in one safetensors file
//!   (for SDXL the names of diffusers' `scripts/convert_diffusers_to_original_sdxl.py`).
//!
//! `.ckpt` files are read by a restricted unpickler ([`ckpt`]) that refuses any global other
//! than the few a state dict needs. Outputs are written to a temporary sibling and renamed into
//! place, so a failed conversion leaves nothing at the target path.

pub mod ckpt;
pub mod error;
pub mod mapping;
pub mod tensor;

use std::path::{Path, PathBuf};

use decorr_core::MemoryModel;
pub use error::ConvertError;
use mapping::{Table, UnetShape, VaeShape};
pub use tensor::{DType, StateDict, Tensor};

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// SDXL's first text encoder (OpenAI CLIP ViT-L, transformers names below the prefix).
pub const SDXL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// SDXL's second text encoder (OpenCLIP ViT-bigG text tower, OpenCLIP names).
pub const SDXL_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";
/// Every SDXL text-encoder name starts so (generative-models' `GeneralConditioner`).
const SDXL_CONDITIONER: &str = "conditioner.";
/// The SDXL refiner's only text encoder (OpenCLIP bigG as embedder 0), which this crate does
/// not convert.
const SDXL_REFINER_PREFIX: &str = "conditioner.embedders.0.model.";
const EMA_PREFIX: &str = "model_ema.";
/// Buffers of LDM's `LatentDiffusion` (noise schedule, logvar) and the VAE's training loss:
/// present in many checkpoints, not part of any diffusers model.
const IGNORED_KEYS: &[&str] = &[
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    // generative-models' discrete denoiser (some SDXL files): the schedule, not a weight.
    "denoiser.sigmas",
    "denoiser.log_sigmas",
];
const IGNORED_PREFIXES: &[&str] = &["first_stage_model.loss."];

mod assets {
    pub const SD15_UNET: &str = include_str!("../assets/sd15/unet/config.json");
    pub const SD15_VAE: &str = include_str!("../assets/sd15/vae/config.json");
    pub const SD15_TEXT: &str = include_str!("../assets/sd15/text_encoder/config.json");
    pub const SD15_SCHEDULER: &str = include_str!("../assets/sd15/scheduler/scheduler_config.json");
    pub const TOKENIZER_CONFIG: &str =
        include_str!("../assets/sd15/tokenizer/tokenizer_config.json");
    pub const SPECIAL_TOKENS: &str =
        include_str!("../assets/sd15/tokenizer/special_tokens_map.json");
    pub const VOCAB: &str = include_str!("../../../assets/clip/vocab.json");
    pub const MERGES: &str = include_str!("../../../assets/clip/merges.txt");
    pub const SD2_UNET: &str = include_str!("../assets/sd2/unet/config.json");
    pub const SD2_VAE: &str = include_str!("../assets/sd2/vae/config.json");
    pub const SD2_TEXT: &str = include_str!("../assets/sd2/text_encoder/config.json");
    pub const SD2_SCHEDULER: &str = include_str!("../assets/sd2/scheduler/scheduler_config.json");
    pub const SD2_TOKENIZER_CONFIG: &str =
        include_str!("../assets/sd2/tokenizer/tokenizer_config.json");
    pub const SD2_SPECIAL_TOKENS: &str =
        include_str!("../assets/sd2/tokenizer/special_tokens_map.json");
    // SDXL base 1.0's configs (stabilityai/stable-diffusion-xl-base-1.0, which diffusers'
    // single-file loader fetches for every SDXL file); its tokenizer is SD 1's, its
    // tokenizer_2 SD 2's (padding with "!").
    pub const SDXL_UNET: &str = include_str!("../assets/sdxl/unet/config.json");
    pub const SDXL_VAE: &str = include_str!("../assets/sdxl/vae/config.json");
    pub const SDXL_TEXT: &str = include_str!("../assets/sdxl/text_encoder/config.json");
    pub const SDXL_TEXT_2: &str = include_str!("../assets/sdxl/text_encoder_2/config.json");
    pub const SDXL_SCHEDULER: &str = include_str!("../assets/sdxl/scheduler/scheduler_config.json");
    /// As diffusers 0.42's `save_pretrained` writes it for a `StableDiffusionXLPipeline`.
    pub const SDXL_MODEL_INDEX: &str = r#"{
  "_class_name": "StableDiffusionXLPipeline",
  "_diffusers_version": "0.42.1",
  "feature_extractor": [null, null],
  "force_zeros_for_empty_prompt": true,
  "image_encoder": [null, null],
  "scheduler": ["diffusers", "EulerDiscreteScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
  "tokenizer": ["transformers", "CLIPTokenizer"],
  "tokenizer_2": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}
"#;
    pub const MODEL_INDEX: &str = r#"{
  "_class_name": "StableDiffusionPipeline",
  "_diffusers_version": "0.6.0",
  "feature_extractor": [null, null],
  "requires_safety_checker": false,
  "safety_checker": [null, null],
  "scheduler": ["diffusers", "PNDMScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "tokenizer": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}
"#;
}

/// Which model configs describe the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigChoice {
    /// Detect from the text encoder: OpenAI CLIP 768 wide is SD 1.x, OpenCLIP
    /// (`cond_stage_model.model.*`) 1024 wide is SD 2.x, `conditioner.embedders.*` encoders
    /// 768 and 1280 wide are SDXL base.
    Auto,
    /// Stable Diffusion 1.5's configs (embedded).
    Sd15,
    /// Stable Diffusion 2.x's configs (embedded; those of `stabilityai/stable-diffusion-2-1`,
    /// which diffusers' single-file loader uses for every SD 2.x file).
    Sd2,
    /// SDXL base 1.0's configs (embedded; diffusers' single-file loader uses them for every
    /// SDXL file).
    Sdxl,
    /// A diffusers folder whose `unet/`, `vae/`, `text_encoder/` (SDXL: and `text_encoder_2/`;
    /// optionally `scheduler/`) hold the config.json files describing the checkpoint.
    Dir(PathBuf),
}

/// What the UNet predicts, written to `scheduler/scheduler_config.json` as `prediction_type`.
///
/// Single files do not record it. diffusers 0.42's `from_single_file` takes the scheduler of
/// `stabilityai/stable-diffusion-2-1` for every SD 2.x file, i.e. `v_prediction` (its legacy
/// path picks `epsilon` only for a `.ckpt` whose `global_step` is 875000, SD 2.0-base); SD 1.x is
/// `epsilon`, and so is SDXL base. Those are the defaults here; the 512 "base" SD 2.x models
/// (and other epsilon fine-tunes) need [`Prediction::Epsilon`], v-prediction SDXL fine-tunes
/// [`Prediction::VPrediction`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

impl Prediction {
    pub fn as_str(self) -> &'static str {
        match self {
            Prediction::Epsilon => "epsilon",
            Prediction::VPrediction => "v_prediction",
        }
    }
}

impl std::str::FromStr for Prediction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "epsilon" | "eps" => Ok(Prediction::Epsilon),
            "v_prediction" | "v-prediction" | "v" => Ok(Prediction::VPrediction),
            other => Err(format!(
                "prediction type `{other}` is not epsilon or v_prediction"
            )),
        }
    }
}

/// The model family, from the text encoder's naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// OpenAI CLIP ViT-L text encoder, `cond_stage_model.transformer.*`.
    Sd1,
    /// OpenCLIP ViT-H text tower, `cond_stage_model.model.*`.
    Sd2,
    /// Two text encoders: CLIP ViT-L (`conditioner.embedders.0.transformer.*`) and the OpenCLIP
    /// bigG text tower with its projection (`conditioner.embedders.1.model.*`).
    Sdxl,
}

impl Family {
    /// How messages name the family and its text-encoder tensors.
    fn describe(self) -> &'static str {
        match self {
            Family::Sd1 => "OpenAI CLIP (`cond_stage_model.transformer.*`, SD 1.x)",
            Family::Sd2 => "OpenCLIP (`cond_stage_model.model.*`, SD 2.x)",
            Family::Sdxl => {
                "SDXL's two encoders (`conditioner.embedders.0.transformer.*` and `conditioner.embedders.1.model.*`)"
            }
        }
    }
}

impl std::str::FromStr for ConfigChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => ConfigChoice::Auto,
            "sd15" => ConfigChoice::Sd15,
            "sd2" => ConfigChoice::Sd2,
            "sdxl" => ConfigChoice::Sdxl,
            other if Path::new(other).is_dir() => ConfigChoice::Dir(other.into()),
            other => {
                return Err(format!(
                    "`{other}` is not sd15, sd2, sdxl, auto or an existing config folder"
                ));
            }
        })
    }
}

/// Parse `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "f16" | "fp16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(format!("dtype `{other}` is not f32, f16 or bf16")),
    }
}

/// Options of [`convert_single_file_to_diffusers`].
#[derive(Debug, Clone)]
pub struct ToDiffusers {
    /// Cast float tensors to this dtype; `None` keeps each tensor's dtype.
    pub dtype: Option<DType>,
    pub config: ConfigChoice,
    /// Take the UNet from the EMA weights (`model_ema.*`), as diffusers' `extract_ema`.
    pub ema: bool,
    /// Override the scheduler's `prediction_type`; `None` keeps the config's (see
    /// [`Prediction`] for the defaults). With the `Sd2` preset, `Epsilon` also sets the 512
    /// base models' `sample_size` (UNet 64, VAE 512).
    pub prediction: Option<Prediction>,
    /// How messages name the option that sets `config`: `--config` (xtask's
    /// `convert-weights`, the default) or `--checkpoint-config` (decorr's `--weights FILE`).
    pub config_flag: &'static str,
}

impl Default for ToDiffusers {
    fn default() -> Self {
        Self {
            dtype: None,
            config: ConfigChoice::Auto,
            ema: false,
            prediction: None,
            config_flag: "--config",
        }
    }
}

/// Options of [`convert_diffusers_to_single_file`].
#[derive(Debug, Clone, Default)]
pub struct ToSingleFile {
    pub dtype: Option<DType>,
    /// Take the text encoder from this folder (a `text_encoder/` folder or a diffusers folder
    /// holding one) instead of the source's.
    pub text_encoder: Option<PathBuf>,
    /// SDXL: take the second text encoder from this folder (a `text_encoder_2/` folder or a
    /// diffusers folder holding one) instead of the source's, e.g. to merge fine-tuned encoders
    /// back into one file.
    pub text_encoder_2: Option<PathBuf>,
}

/// What a conversion wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub text_encoder: usize,
    /// SDXL's second text encoder; 0 for SD 1.x/2.x.
    pub text_encoder_2: usize,
    pub unet: usize,
    pub vae: usize,
    pub ignored: usize,
}

/// Read all tensors of a single-file checkpoint: safetensors or a PyTorch zip `.ckpt`,
/// recognised by content, not by extension.
pub fn read_state_dict(path: &Path) -> Result<StateDict, ConvertError> {
    use std::io::Read;
    let io = |source| ConvertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut head = [0u8; 9];
    // A FIFO or a device is refused by name (decorr_core::input), never waited on.
    let mut f = decorr_core::input::open(path, "a checkpoint file")?;
    let mut n = 0;
    while n < head.len() {
        let r = f.read(&mut head[n..]).map_err(io)?;
        if r == 0 {
            break;
        }
        n += r;
    }
    let head = &head[..n];
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return ckpt::read_ckpt(path);
    }
    if n == 9 && head[8] == b'{' {
        return tensor::read_safetensors(path);
    }
    if head.first() == Some(&0x80) {
        // A pickle protocol opcode: torch's legacy (pre-1.6, non-zip) format.
        return ckpt::read_legacy(path);
    }
    Err(ConvertError::UnknownFormat {
        path: path.to_path_buf(),
        magic: head
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" "),
    })
}

struct Configs {
    unet: String,
    vae: String,
    text: String,
    /// SDXL's `text_encoder_2/config.json`.
    text2: Option<String>,
    scheduler: String,
    origin: PathBuf,
    family: Family,
}

/// A config's text: a regular file of at most 16 MiB (decorr_core::input).
fn read_text(path: &Path) -> Result<String, ConvertError> {
    Ok(decorr_core::input::read_text(path, "a checkpoint config")?)
}

fn parse_json(text: &str, path: &Path) -> Result<serde_json::Value, ConvertError> {
    // A leading byte-order mark is not JSON; skip it.
    let text = decorr_core::io::strip_bom(text);
    serde_json::from_str(text).map_err(|e| ConvertError::BadConfig {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn sd15_configs() -> Configs {
    Configs {
        unet: assets::SD15_UNET.into(),
        vae: assets::SD15_VAE.into(),
        text: assets::SD15_TEXT.into(),
        text2: None,
        scheduler: assets::SD15_SCHEDULER.into(),
        origin: PathBuf::from("<embedded sd15>"),
        family: Family::Sd1,
    }
}

fn sd2_configs(prediction: Option<Prediction>) -> Configs {
    let mut c = Configs {
        unet: assets::SD2_UNET.into(),
        vae: assets::SD2_VAE.into(),
        text: assets::SD2_TEXT.into(),
        text2: None,
        scheduler: assets::SD2_SCHEDULER.into(),
        origin: PathBuf::from("<embedded sd2>"),
        family: Family::Sd2,
    };
    if prediction == Some(Prediction::Epsilon) {
        // stabilityai/stable-diffusion-2-1-base: 512 px.
        c.unet = c.unet.replace("\"sample_size\": 96", "\"sample_size\": 64");
        c.vae = c
            .vae
            .replace("\"sample_size\": 768", "\"sample_size\": 512");
    }
    c
}

fn sdxl_configs() -> Configs {
    Configs {
        unet: assets::SDXL_UNET.into(),
        vae: assets::SDXL_VAE.into(),
        text: assets::SDXL_TEXT.into(),
        text2: Some(assets::SDXL_TEXT_2.into()),
        scheduler: assets::SDXL_SCHEDULER.into(),
        origin: PathBuf::from("<embedded sdxl>"),
        family: Family::Sdxl,
    }
}

/// The family from the text-encoder names. SDXL needs both of its encoders: a file with only
/// one, or with SD's and SDXL's names mixed, is refused naming what is there and what is not.
fn family_of(sd: &StateDict) -> Result<Family, ConvertError> {
    let has = |prefix: &str| sd.keys().any(|k| k.starts_with(prefix));
    let clip = has(CLIP_PREFIX);
    let open_clip = has(OPEN_CLIP_PREFIX);
    if has(SDXL_CONDITIONER) {
        if clip || open_clip {
            return Err(ConvertError::Unsupported(format!(
                "the file mixes SD 1.x/2.x text encoder tensors (`cond_stage_model.*`) with SDXL ones (`{SDXL_CONDITIONER}*`): it is not one model"
            )));
        }
        let sdxl_clip = has(SDXL_CLIP_PREFIX);
        let sdxl_open = has(SDXL_OPEN_CLIP_PREFIX);
        if has(SDXL_REFINER_PREFIX) && !sdxl_clip {
            return Err(ConvertError::Unsupported(format!(
                "this looks like the SDXL refiner (one OpenCLIP bigG encoder at `{SDXL_REFINER_PREFIX}*`): only SDXL base-architecture files (two text encoders) are supported"
            )));
        }
        return match (sdxl_clip, sdxl_open) {
            (true, true) => Ok(Family::Sdxl),
            (false, _) => Err(ConvertError::Missing(format!(
                "the file looks like SDXL (`{SDXL_CONDITIONER}*` tensors) but has no first text encoder (CLIP ViT-L, `{SDXL_CLIP_PREFIX}*`): it is incomplete; convert a complete SDXL file"
            ))),
            (true, false) => Err(ConvertError::Missing(format!(
                "the file looks like SDXL (`{SDXL_CLIP_PREFIX}*` tensors) but has no second text encoder (OpenCLIP bigG, `{SDXL_OPEN_CLIP_PREFIX}*`): it is incomplete; convert a complete SDXL file"
            ))),
        };
    }
    match (clip, open_clip) {
        (true, true) => Err(ConvertError::Unsupported(format!(
            "the file has both an OpenAI CLIP (`{CLIP_PREFIX}*`) and an OpenCLIP (`{OPEN_CLIP_PREFIX}*`) text encoder"
        ))),
        (false, true) => Ok(Family::Sd2),
        _ => Ok(Family::Sd1),
    }
}

/// The width of the text encoder(s) from their final layer norms: `(first, second)`, the
/// second only for SDXL.
fn text_widths(sd: &StateDict, family: Family) -> (Option<usize>, Option<usize>) {
    let width = |keys: &[String]| {
        keys.iter()
            .find_map(|k| sd.get(k))
            .and_then(|t| t.shape.first().copied())
    };
    let clip = |prefix: &str| {
        width(&[
            format!("{prefix}text_model.final_layer_norm.weight"),
            format!("{prefix}final_layer_norm.weight"),
        ])
    };
    let open_clip = |prefix: &str| width(&[format!("{prefix}ln_final.weight")]);
    match family {
        Family::Sd1 => (clip(CLIP_PREFIX), None),
        Family::Sd2 => (open_clip(OPEN_CLIP_PREFIX), None),
        Family::Sdxl => (clip(SDXL_CLIP_PREFIX), open_clip(SDXL_OPEN_CLIP_PREFIX)),
    }
}

fn pick_configs(
    choice: &ConfigChoice,
    sd: &StateDict,
    prediction: Option<Prediction>,
    flag: &str,
) -> Result<Configs, ConvertError> {
    let family = family_of(sd)?;
    let fits = match family {
        Family::Sd1 => "sd15",
        Family::Sd2 => "sd2",
        Family::Sdxl => "sdxl",
    };
    let preset_mismatch = |preset: &str| {
        ConvertError::Unsupported(format!(
            "{flag} {preset} does not fit this file: its text encoder is {} (use {flag} {fits} or auto)",
            family.describe()
        ))
    };
    match choice {
        ConfigChoice::Sd15 if family != Family::Sd1 => Err(preset_mismatch("sd15")),
        ConfigChoice::Sd15 => Ok(sd15_configs()),
        ConfigChoice::Sd2 if family != Family::Sd2 => Err(preset_mismatch("sd2")),
        ConfigChoice::Sd2 => Ok(sd2_configs(prediction)),
        ConfigChoice::Sdxl if family != Family::Sdxl => Err(preset_mismatch("sdxl")),
        ConfigChoice::Sdxl => Ok(sdxl_configs()),
        ConfigChoice::Auto => match (family, text_widths(sd, family)) {
            (Family::Sd1, (Some(768), _)) => Ok(sd15_configs()),
            (Family::Sd2, (Some(1024), _)) => Ok(sd2_configs(prediction)),
            (Family::Sdxl, (Some(768), Some(1280))) => Ok(sdxl_configs()),
            (Family::Sdxl, (a, b)) => Err(ConvertError::Unsupported(format!(
                "cannot pick configs for this SDXL-named file (text encoder widths {a:?} and {b:?}, SDXL base has 768 and 1280); pass {flag} DIR with unet/, vae/, text_encoder/ and text_encoder_2/ config.json files"
            ))),
            (f, (other, _)) => Err(ConvertError::Unsupported(format!(
                "cannot detect the model family ({} text encoder width {other:?}); pass {flag} DIR with unet/, vae/ and text_encoder/ config.json files",
                match f {
                    Family::Sd2 => "OpenCLIP",
                    _ => "CLIP",
                }
            ))),
        },
        ConfigChoice::Dir(dir) => {
            let sched = dir.join("scheduler/scheduler_config.json");
            let text2 = match family {
                Family::Sdxl => {
                    let p = dir.join("text_encoder_2/config.json");
                    if !p.is_file() {
                        return Err(ConvertError::Missing(format!(
                            "{} has no text_encoder_2/config.json, which an SDXL file's second text encoder needs (pass {flag} with an SDXL diffusers folder, or {flag} sdxl)",
                            dir.display()
                        )));
                    }
                    Some(read_text(&p)?)
                }
                _ => None,
            };
            Ok(Configs {
                unet: read_text(&dir.join("unet/config.json"))?,
                vae: read_text(&dir.join("vae/config.json"))?,
                text: read_text(&dir.join("text_encoder/config.json"))?,
                text2,
                scheduler: if sched.is_file() {
                    read_text(&sched)?
                } else {
                    match family {
                        Family::Sd1 => assets::SD15_SCHEDULER.into(),
                        Family::Sd2 => assets::SD2_SCHEDULER.into(),
                        Family::Sdxl => assets::SDXL_SCHEDULER.into(),
                    }
                },
                origin: dir.clone(),
                family,
            })
        }
    }
}

/// The models of a checkpoint, LDM names less their model prefix.
struct Split {
    text: StateDict,
    /// SDXL's second text encoder (names below `conditioner.embedders.1.model.`).
    text2: StateDict,
    unet: StateDict,
    vae: StateDict,
    ignored: usize,
}

fn split_ldm(mut sd: StateDict, ema: bool, family: Family) -> Result<Split, ConvertError> {
    let mut text = StateDict::new();
    let mut text2 = StateDict::new();
    let mut unet = StateDict::new();
    let mut vae = StateDict::new();
    let mut emas = StateDict::new();
    let mut unknown = Vec::new();
    let mut ignored = 0;
    for (k, t) in std::mem::take(&mut sd) {
        if let Some(r) = k.strip_prefix(UNET_PREFIX) {
            unet.insert(r.to_string(), t);
        } else if IGNORED_PREFIXES.iter().any(|p| k.starts_with(p)) {
            ignored += 1;
        } else if let Some(r) = k.strip_prefix(VAE_PREFIX) {
            vae.insert(r.to_string(), t);
        } else if let Some(r) = k
            .strip_prefix(CLIP_PREFIX)
            .or_else(|| k.strip_prefix(OPEN_CLIP_PREFIX))
            .or_else(|| k.strip_prefix(SDXL_CLIP_PREFIX))
        {
            // family_of has refused files mixing these.
            text.insert(r.to_string(), t);
        } else if let Some(r) = k.strip_prefix(SDXL_OPEN_CLIP_PREFIX) {
            text2.insert(r.to_string(), t);
        } else if k.starts_with(EMA_PREFIX) {
            emas.insert(k, t);
        } else if IGNORED_KEYS.contains(&k.as_str()) {
            ignored += 1;
        } else {
            unknown.push(k);
        }
    }
    if !unknown.is_empty() {
        let n = unknown.len();
        unknown.truncate(8);
        let mut keys = unknown.join(", ");
        if n > 8 {
            keys.push_str(&format!(" and {} more", n - 8));
        }
        return Err(ConvertError::UnknownKeys { keys });
    }
    if ema {
        let weights = emas
            .keys()
            .filter(|k| !matches!(k.as_str(), "model_ema.decay" | "model_ema.num_updates"))
            .count();
        if weights == 0 {
            return Err(ConvertError::Missing(
                "EMA weights were asked for (--ema) but the file has no `model_ema.*` tensors"
                    .into(),
            ));
        }
        for (k, t) in unet.iter_mut() {
            // diffusers: "model_ema." + "".join(key.split(".")[1:])
            let flat = format!("{EMA_PREFIX}diffusion_model{}", k.replace('.', ""));
            *t = emas.remove(&flat).ok_or_else(|| {
                ConvertError::Missing(format!("EMA tensor `{flat}` for `{UNET_PREFIX}{k}`"))
            })?;
        }
    }
    ignored += emas.len();
    // A UNet with SDXL's added embedding (`label_emb`) names SDXL's encoders when they are
    // missing (family_of has already refused a file with only one of them).
    let text_what = if family == Family::Sdxl || unet.contains_key("label_emb.0.0.weight") {
        "text encoder (SDXL: conditioner.embedders.0.transformer.* and conditioner.embedders.1.model.*)"
    } else {
        "text encoder (cond_stage_model.transformer.* or cond_stage_model.model.*)"
    };
    for (what, part) in [
        (text_what, &text),
        ("UNet (model.diffusion_model.*)", &unet),
        ("VAE (first_stage_model.*)", &vae),
    ] {
        if part.is_empty() {
            return Err(ConvertError::Missing(format!(
                "the file has no {what} tensors"
            )));
        }
    }
    Ok(Split {
        text,
        text2,
        unet,
        vae,
        ignored,
    })
}

fn check_shape(
    sd: &StateDict,
    key: &str,
    dim: usize,
    expect: Option<u64>,
    cfg_path: &Path,
    field: &str,
    flag: &str,
) -> Result<(), ConvertError> {
    let (Some(t), Some(e)) = (sd.get(key), expect) else {
        return Ok(());
    };
    if t.shape.get(dim).map(|&d| d as u64) != Some(e) {
        return Err(ConvertError::BadConfig {
            path: cfg_path.to_path_buf(),
            message: format!(
                "`{field}` is {e} but tensor `{key}` has shape {:?}: the config does not describe this checkpoint (use {flag})",
                t.shape
            ),
        });
    }
    Ok(())
}

fn cast_all(sd: StateDict, dtype: Option<DType>) -> StateDict {
    match dtype {
        None => sd,
        Some(d) => sd.into_iter().map(|(k, t)| (k, t.cast(d))).collect(),
    }
}

/// A temporary folder next to `target` that becomes `target` on [`TempOut::commit`] and is
/// removed when dropped uncommitted.
struct TempOut {
    dir: tempfile::TempDir,
    target: PathBuf,
}

impl TempOut {
    fn new(target: &Path) -> Result<Self, ConvertError> {
        // A link is followed: the folder appears where it points, the link stays.
        let target = &decorr_core::io::resolve_links(target);
        if target.exists() {
            return Err(ConvertError::OutputExists(target.to_path_buf()));
        }
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let io = |source| ConvertError::Io {
            path: parent.clone(),
            source,
        };
        std::fs::create_dir_all(&parent).map_err(io)?;
        // Named `.decorr-tmp-PID-MAKER-*`, so what a killed conversion left is recognised and removed.
        decorr_core::io::remove_stale_temps(&parent, 0);
        let dir = decorr_core::io::temp_dir_beside(target).map_err(io)?;
        Ok(Self {
            dir,
            target: target.to_path_buf(),
        })
    }
    fn write(&self, rel: &str, bytes: &[u8]) -> Result<(), ConvertError> {
        let p = self.dir.path().join(rel);
        let io = |source| ConvertError::Io {
            path: p.clone(),
            source,
        };
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        std::fs::write(&p, bytes).map_err(io)
    }
    fn commit(self) -> Result<(), ConvertError> {
        let target = self.target.clone();
        let tmp = self.dir.keep();
        let _ = decorr_core::io::make_readable(&tmp);
        std::fs::rename(&tmp, &target).map_err(|source| {
            let _ = std::fs::remove_dir_all(&tmp);
            ConvertError::Io {
                path: target.clone(),
                source,
            }
        })
    }
}

/// Convert a single-file LDM checkpoint (`from`) to a diffusers folder (`to`, which must not
/// exist): [`convert_single_file`], then [`write_diffusers_folder`]. Nothing is created at `to`
/// unless the whole conversion succeeds.
pub fn convert_single_file_to_diffusers(
    from: &Path,
    to: &Path,
    opts: &ToDiffusers,
) -> Result<Summary, ConvertError> {
    if to.exists() {
        return Err(ConvertError::OutputExists(to.to_path_buf()));
    }
    let (model, summary) = convert_single_file(from, opts)?;
    write_diffusers_folder(&model, to)?;
    Ok(summary)
}

/// Write the files of `model` as a folder at `to` (which must not exist): into a temporary
/// sibling that is renamed into place, so nothing is left at `to` if writing fails.
pub fn write_diffusers_folder(model: &MemoryModel, to: &Path) -> Result<(), ConvertError> {
    let out = TempOut::new(to)?;
    for (rel, bytes) in model.files() {
        out.write(rel, bytes)?;
    }
    out.commit()
}

/// Convert a single-file LDM checkpoint (`from`) to the files of a diffusers folder, held in
/// memory (`unet/config.json`, `unet/diffusion_pytorch_model.safetensors`, `tokenizer/vocab.json`,
/// ..., and `model_index.json`), named `FROM (converted)` in messages. Loaders read it as
/// [`decorr_core::ModelSource::Memory`]; [`write_diffusers_folder`] writes it to disk.
///
/// Memory: reading a safetensors file holds the file's bytes and the tensors copied out of them
/// (two copies, briefly); after that each model is serialized and then dropped, so about one
/// copy of the weights plus one serialized model (the UNet's, the largest) is held at the peak,
/// and one copy at the end. For a 6.9 GB f16 SDXL file that is about 14 GB while reading and
/// 12 GB while serializing.
pub fn convert_single_file(
    from: &Path,
    opts: &ToDiffusers,
) -> Result<(MemoryModel, Summary), ConvertError> {
    let sd = read_state_dict(from)?;
    let flag = opts.config_flag;
    let cfgs = pick_configs(&opts.config, &sd, opts.prediction, flag)?;
    let family = cfgs.family;
    let split = split_ldm(sd, opts.ema, family)?;
    let unet_cfg_path = cfgs.origin.join("unet/config.json");
    let vae_cfg_path = cfgs.origin.join("vae/config.json");
    let text_cfg_path = cfgs.origin.join("text_encoder/config.json");
    let text2_cfg_path = cfgs.origin.join("text_encoder_2/config.json");
    let unet_cfg = parse_json(&cfgs.unet, &unet_cfg_path)?;
    let vae_cfg = parse_json(&cfgs.vae, &vae_cfg_path)?;
    let text_cfg = parse_json(&cfgs.text, &text_cfg_path)?;
    let text2_cfg = cfgs
        .text2
        .as_deref()
        .map(|t| parse_json(t, &text2_cfg_path))
        .transpose()?;
    let sched_path = cfgs.origin.join("scheduler/scheduler_config.json");
    let mut sched_cfg = parse_json(&cfgs.scheduler, &sched_path)?;
    let scheduler_text = match opts.prediction {
        None => cfgs.scheduler.clone(),
        Some(p) => {
            let obj = sched_cfg
                .as_object_mut()
                .ok_or_else(|| ConvertError::BadConfig {
                    path: sched_path.clone(),
                    message: "not a JSON object".into(),
                })?;
            obj.insert("prediction_type".into(), p.as_str().into());
            serde_json::to_string_pretty(&sched_cfg).expect("a JSON value serializes") + "\n"
        }
    };
    // The model index template names its default scheduler class, replaced by the config's.
    let (index_template, default_scheduler) = match family {
        Family::Sdxl => (assets::SDXL_MODEL_INDEX, "EulerDiscreteScheduler"),
        Family::Sd1 | Family::Sd2 => (assets::MODEL_INDEX, "PNDMScheduler"),
    };
    let scheduler_class = sched_cfg
        .get("_class_name")
        .and_then(|v| v.as_str())
        .unwrap_or(default_scheduler)
        .to_string();
    let bad = |path: &Path| {
        let path = path.to_path_buf();
        move |message: String| ConvertError::BadConfig { path, message }
    };
    let unet_shape = UnetShape::from_config(&unet_cfg).map_err(bad(&unet_cfg_path))?;
    let vae_shape = VaeShape::from_config(&vae_cfg).map_err(bad(&vae_cfg_path))?;

    let not_described = |path: &Path| {
        let path = path.to_path_buf();
        move |e: ConvertError| match e {
            ConvertError::UnknownKeys { keys } => ConvertError::BadConfig {
                path,
                message: format!(
                    "the config does not describe these tensors of the checkpoint (wrong {flag}?): {keys}"
                ),
            },
            other => other,
        }
    };
    let unet = Table::unet(&unet_shape)
        .to_diffusers(split.unet, UNET_PREFIX)
        .map_err(not_described(&unet_cfg_path))?;
    let vae = Table::vae(&vae_shape)
        .to_diffusers(split.vae, VAE_PREFIX)
        .map_err(not_described(&vae_cfg_path))?;
    let mut ignored = split.ignored;
    let text = match family {
        Family::Sd1 | Family::Sdxl => mapping::clip_to_diffusers(split.text),
        Family::Sd2 => {
            let layers = num_layers(&text_cfg, &text_cfg_path)?;
            let oc = mapping::open_clip_to_diffusers(split.text, layers, OPEN_CLIP_PREFIX)?;
            if oc.resblocks < layers {
                return Err(ConvertError::BadConfig {
                    path: text_cfg_path.clone(),
                    message: format!(
                        "`num_hidden_layers` is {layers} but the checkpoint's OpenCLIP text encoder has {} resblocks: the config does not describe this checkpoint (use {flag})",
                        oc.resblocks
                    ),
                });
            }
            ignored += oc.dropped;
            oc.tensors
        }
    };
    let text2 = match &text2_cfg {
        Some(cfg) => {
            let (t, dropped) = sdxl_text_2(split.text2, cfg, &text2_cfg_path, flag)?;
            ignored += dropped;
            Some(t)
        }
        None => None,
    };

    let first = |cfg: &serde_json::Value| {
        cfg.get("block_out_channels")
            .and_then(|v| v.get(0))
            .and_then(|v| v.as_u64())
    };
    let field = |cfg: &serde_json::Value, key: &str| cfg.get(key).and_then(|v| v.as_u64());
    check_shape(
        &unet,
        "conv_in.weight",
        0,
        first(&unet_cfg),
        &unet_cfg_path,
        "block_out_channels[0]",
        flag,
    )?;
    // An inpainting file (9 input channels) needs an inpainting config.
    check_shape(
        &unet,
        "conv_in.weight",
        1,
        field(&unet_cfg, "in_channels"),
        &unet_cfg_path,
        "in_channels",
        flag,
    )?;
    // The first cross-attention key (SDXL's first level has none).
    if let Some(key) = unet.keys().find(|k| k.ends_with(".attn2.to_k.weight")) {
        check_shape(
            &unet,
            key,
            1,
            field(&unet_cfg, "cross_attention_dim"),
            &unet_cfg_path,
            "cross_attention_dim",
            flag,
        )?;
    }
    if let Some(module) = unet_shape.label_emb {
        check_shape(
            &unet,
            &format!("{module}.linear_1.weight"),
            1,
            field(&unet_cfg, "projection_class_embeddings_input_dim"),
            &unet_cfg_path,
            "projection_class_embeddings_input_dim",
            flag,
        )?;
    }
    check_shape(
        &vae,
        "encoder.conv_in.weight",
        0,
        first(&vae_cfg),
        &vae_cfg_path,
        "block_out_channels[0]",
        flag,
    )?;
    // Each encoder's widths against its config (the projection only exists in SDXL's second).
    let text_checks = [
        ("text_model.final_layer_norm.weight", 0, "hidden_size"),
        (
            "text_model.embeddings.token_embedding.weight",
            0,
            "vocab_size",
        ),
        ("text_projection.weight", 0, "projection_dim"),
        ("text_projection.weight", 1, "hidden_size"),
    ];
    let mut encoders = vec![(&text, &text_cfg, &text_cfg_path)];
    if let (Some(t2), Some(c2)) = (&text2, &text2_cfg) {
        encoders.push((t2, c2, &text2_cfg_path));
    }
    for (sd, cfg, path) in encoders {
        for (key, dim, name) in text_checks {
            check_shape(sd, key, dim, field(cfg, name), path, name, flag)?;
        }
    }

    let summary = Summary {
        text_encoder: text.len(),
        text_encoder_2: text2.as_ref().map_or(0, |t| t.len()),
        unet: unet.len(),
        vae: vae.len(),
        ignored,
    };
    // SD 2's tokenizer is SD 1's vocabulary with "!" (id 0) as the padding token; SDXL's
    // tokenizer is SD 1's and its tokenizer_2 SD 2's.
    let (tok_cfg, special) = match family {
        Family::Sd1 | Family::Sdxl => (assets::TOKENIZER_CONFIG, assets::SPECIAL_TOKENS),
        Family::Sd2 => (assets::SD2_TOKENIZER_CONFIG, assets::SD2_SPECIAL_TOKENS),
    };
    let mut out = MemoryModel::new(format!("{} (converted)", from.display()));
    out.insert(
        "model_index.json",
        index_template
            .replace(
                &format!("\"{default_scheduler}\""),
                &serde_json::Value::from(scheduler_class).to_string(),
            )
            .into_bytes(),
    );
    out.insert(
        "scheduler/scheduler_config.json",
        scheduler_text.into_bytes(),
    );
    let mut tokenizers = vec![("tokenizer", tok_cfg, special)];
    if family == Family::Sdxl {
        tokenizers.push((
            "tokenizer_2",
            assets::SD2_TOKENIZER_CONFIG,
            assets::SD2_SPECIAL_TOKENS,
        ));
    }
    for (dir, cfg, special) in tokenizers {
        out.insert(
            format!("{dir}/vocab.json"),
            assets::VOCAB.as_bytes().to_vec(),
        );
        out.insert(
            format!("{dir}/merges.txt"),
            assets::MERGES.as_bytes().to_vec(),
        );
        out.insert(
            format!("{dir}/tokenizer_config.json"),
            cfg.as_bytes().to_vec(),
        );
        out.insert(
            format!("{dir}/special_tokens_map.json"),
            special.as_bytes().to_vec(),
        );
    }
    out.insert("text_encoder/config.json", cfgs.text.into_bytes());
    if let Some(text2) = cfgs.text2 {
        out.insert("text_encoder_2/config.json", text2.into_bytes());
    }
    out.insert("unet/config.json", cfgs.unet.into_bytes());
    out.insert("vae/config.json", cfgs.vae.into_bytes());
    // One model at a time: each state dict is dropped once serialized.
    let mut models = vec![("text_encoder/model.safetensors", text)];
    if let Some(text2) = text2 {
        models.push(("text_encoder_2/model.safetensors", text2));
    }
    models.push(("unet/diffusion_pytorch_model.safetensors", unet));
    models.push(("vae/diffusion_pytorch_model.safetensors", vae));
    for (rel, tensors) in models {
        let bytes = tensor::to_safetensors_bytes(&cast_all(tensors, opts.dtype))?;
        out.insert(rel, bytes);
    }
    Ok((out, summary))
}

/// `num_hidden_layers` of a text encoder config.
fn num_layers(cfg: &serde_json::Value, path: &Path) -> Result<usize, ConvertError> {
    cfg.get("num_hidden_layers")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .ok_or_else(|| ConvertError::BadConfig {
            path: path.to_path_buf(),
            message: "`num_hidden_layers` missing or not an integer".into(),
        })
}

/// SDXL's OpenCLIP bigG tower (names below `conditioner.embedders.1.model.`) ->
/// `CLIPTextModelWithProjection` names: as SD 2's encoder, except that every resblock is kept
/// (SDXL reads the penultimate hidden state at run time, so diffusers' text_encoder_2 holds all
/// 32 layers) and `text_projection` is kept, transposed into the Linear's
/// `text_projection.weight`. Returns the tensors and how many were dropped (`logit_scale`).
fn sdxl_text_2(
    mut sd: StateDict,
    cfg: &serde_json::Value,
    cfg_path: &Path,
    flag: &str,
) -> Result<(StateDict, usize), ConvertError> {
    let layers = num_layers(cfg, cfg_path)?;
    let p = SDXL_OPEN_CLIP_PREFIX;
    let projection = match (
        sd.remove("text_projection"),
        sd.remove("text_projection.weight"),
    ) {
        (Some(_), Some(_)) => {
            return Err(ConvertError::Unsupported(format!(
                "the file has both `{p}text_projection` and `{p}text_projection.weight`: it is not one model"
            )));
        }
        (Some(m), None) => mapping::transpose_2d(m, &format!("{p}text_projection"))?,
        // diffusers' convert_diffusers_to_original_sdxl.py stores the Linear weight unchanged
        // under this name (so does ComfyUI's reader): read it as such.
        (None, Some(w)) => w,
        (None, None) => {
            return Err(ConvertError::Missing(format!(
                "`{p}text_projection`: SDXL's second text encoder needs its projection (it makes the pooled text embedding); the file is incomplete"
            )));
        }
    };
    let oc = mapping::open_clip_to_diffusers(sd, layers, p)?;
    if oc.resblocks != layers {
        return Err(ConvertError::BadConfig {
            path: cfg_path.to_path_buf(),
            message: format!(
                "`num_hidden_layers` is {layers} but the checkpoint's OpenCLIP text encoder has {} resblocks (SDXL's text_encoder_2 keeps them all): the config does not describe this checkpoint (use {flag})",
                oc.resblocks
            ),
        });
    }
    let mut tensors = oc.tensors;
    tensors.insert("text_projection.weight".into(), projection);
    Ok((tensors, oc.dropped))
}

fn model_file(dir: &Path, names: &[&str]) -> Result<PathBuf, ConvertError> {
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| ConvertError::Missing(format!("{} has none of {names:?}", dir.display())))
}

/// Convert a diffusers folder (`from`: `unet/`, `vae/`, `text_encoder/`) to one safetensors
/// file in LDM naming (`out`, which must not exist), as SD front-ends load.
///
/// An SD 2.x folder (text encoder config `hidden_act: gelu`, i.e. OpenCLIP; or, without a text
/// encoder config, a UNet with `cross_attention_dim` 1024) gets OpenCLIP names
/// (`cond_stage_model.model.*`, q/k/v fused into `in_proj_*`). The folder holds only the 23
/// resblocks SD 2 uses, so the file has no `resblocks.23` and no `text_projection`: loaders that
/// build the full 24-block tower must load non-strictly (those blocks never affect SD 2's
/// penultimate-layer conditioning).
///
/// An SDXL folder (one with `text_encoder_2/`, or [`ToSingleFile::text_encoder_2`]) gets the
/// names of diffusers' `scripts/convert_diffusers_to_original_sdxl.py`: CLIP ViT-L under
/// `conditioner.embedders.0.transformer.` (with `text_model.` and the `position_ids` buffer, as
/// the original release) and OpenCLIP bigG under `conditioner.embedders.1.model.` (all its
/// resblocks). Unlike that script, which copies `text_projection.weight` unchanged, the
/// projection is written as the original `text_projection` matrix (`[width, proj]`, the Linear
/// weight transposed), the name diffusers' loader and generative-models read. There is no
/// `logit_scale` (diffusers does not keep it; SDXL never uses it).
///
/// Memory: all models' tensors are held (one copy of the weights) while the file is streamed
/// out; reading each model's file briefly holds its bytes too.
pub fn convert_diffusers_to_single_file(
    from: &Path,
    out: &Path,
    opts: &ToSingleFile,
) -> Result<Summary, ConvertError> {
    if out.exists() {
        return Err(ConvertError::OutputExists(out.to_path_buf()));
    }
    let st = [
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
    ];
    let text_files = ["model.safetensors", "model.fp16.safetensors"];
    let unet_dir = from.join("unet");
    let vae_dir = from.join("vae");
    // A replacement encoder: its own folder, or a diffusers folder holding one.
    let encoder_dir = |opt: &Option<PathBuf>, sub: &str| match opt {
        Some(d) if d.join(sub).is_dir() => d.join(sub),
        Some(d) => d.clone(),
        None => from.join(sub),
    };
    let text_dir = encoder_dir(&opts.text_encoder, "text_encoder");
    let text2_dir = encoder_dir(&opts.text_encoder_2, "text_encoder_2");
    let unet_cfg_path = unet_dir.join("config.json");
    let vae_cfg_path = vae_dir.join("config.json");
    let unet_cfg = parse_json(&read_text(&unet_cfg_path)?, &unet_cfg_path)?;
    let vae_cfg = parse_json(&read_text(&vae_cfg_path)?, &vae_cfg_path)?;
    let bad = |path: &Path| {
        let path = path.to_path_buf();
        move |message: String| ConvertError::BadConfig { path, message }
    };
    let unet_shape = UnetShape::from_config(&unet_cfg).map_err(bad(&unet_cfg_path))?;
    let vae_shape = VaeShape::from_config(&vae_cfg).map_err(bad(&vae_cfg_path))?;
    let sdxl = text2_dir.is_dir();
    if !sdxl {
        if opts.text_encoder_2.is_some() {
            return Err(ConvertError::Missing(format!(
                "the second text encoder folder {} does not exist (give a text_encoder_2/ folder or a diffusers folder holding one)",
                text2_dir.display()
            )));
        }
        if unet_shape.label_emb == Some("add_embedding") {
            return Err(ConvertError::Missing(format!(
                "{} has an SDXL UNet (addition_embed_type text_time) but no text_encoder_2/: an SDXL single file needs both text encoders (convert the complete SDXL folder, or pass its second encoder with --text-encoder-2 DIR)",
                from.display()
            )));
        }
    }

    let unet = tensor::read_safetensors(&model_file(&unet_dir, &st)?)?;
    let vae = tensor::read_safetensors(&model_file(&vae_dir, &st)?)?;
    let text = tensor::read_safetensors(&model_file(&text_dir, &text_files)?)?;
    let unet = Table::unet(&unet_shape).to_ldm(unet, "unet")?;
    let vae = Table::vae(&vae_shape).to_ldm(vae, "vae")?;
    let text_cfg_path = text_dir.join("config.json");
    let open_clip = if sdxl {
        false
    } else if text_cfg_path.is_file() {
        let cfg = parse_json(&read_text(&text_cfg_path)?, &text_cfg_path)?;
        cfg.get("hidden_act").and_then(|v| v.as_str()) == Some("gelu")
    } else {
        unet_cfg.get("cross_attention_dim").and_then(|v| v.as_u64()) == Some(1024)
    };

    let mut all = StateDict::new();
    let mut summary = Summary {
        text_encoder: text.len(),
        text_encoder_2: 0,
        unet: unet.len(),
        vae: vae.len(),
        ignored: 0,
    };
    if sdxl {
        let mut text2 = tensor::read_safetensors(&model_file(&text2_dir, &text_files)?)?;
        summary.text_encoder_2 = text2.len();
        let projection = text2.remove("text_projection.weight").ok_or_else(|| {
            ConvertError::Missing(format!(
                "{} has no `text_projection.weight`: SDXL's second text encoder is a CLIPTextModelWithProjection (its projection makes the pooled text embedding)",
                text2_dir.display()
            ))
        })?;
        let projection =
            mapping::transpose_2d(projection, "text_encoder_2: text_projection.weight")?;
        all.insert(
            format!("{SDXL_OPEN_CLIP_PREFIX}text_projection"),
            projection,
        );
        all.extend(
            mapping::diffusers_to_open_clip(text2, "text_encoder_2")?
                .into_iter()
                .map(|(k, t)| (format!("{SDXL_OPEN_CLIP_PREFIX}{k}"), t)),
        );
    }
    let clip_prefix = if sdxl { SDXL_CLIP_PREFIX } else { CLIP_PREFIX };
    let mut unknown = Vec::new();
    let mut n_pos = None;
    let text = if open_clip {
        all.extend(
            mapping::diffusers_to_open_clip(text, "text_encoder")?
                .into_iter()
                .map(|(k, t)| (format!("{OPEN_CLIP_PREFIX}{k}"), t)),
        );
        StateDict::new()
    } else {
        text
    };
    for (k, t) in text {
        if k.ends_with("embeddings.position_ids") {
            continue;
        }
        let Some(k) = mapping::with_text_model(&k) else {
            unknown.push(format!("text_encoder: {k}"));
            continue;
        };
        if k == "text_model.embeddings.position_embedding.weight" {
            n_pos = t.shape.first().copied();
        }
        all.insert(format!("{clip_prefix}{k}"), t);
    }
    if !unknown.is_empty() {
        return Err(ConvertError::UnknownKeys {
            keys: unknown.join(", "),
        });
    }
    // Original SD 1.x and SDXL files carry CLIP's position_ids buffer; some loaders expect it.
    if let Some(n) = n_pos {
        all.insert(
            format!("{clip_prefix}text_model.embeddings.position_ids"),
            Tensor {
                dtype: DType::I64,
                shape: vec![1, n],
                data: (0..n as i64).flat_map(i64::to_le_bytes).collect(),
            },
        );
    }
    all.extend(
        unet.into_iter()
            .map(|(k, t)| (format!("{UNET_PREFIX}{k}"), t)),
    );
    all.extend(
        vae.into_iter()
            .map(|(k, t)| (format!("{VAE_PREFIX}{k}"), t)),
    );
    write_file_atomic(out, &cast_all(all, opts.dtype))?;
    Ok(summary)
}

/// Stream tensors to a temp file next to `out`, then rename it into place (as
/// `decorr_core::io::write_atomic`, without holding the serialized bytes in memory).
fn write_file_atomic(out: &Path, tensors: &StateDict) -> Result<(), ConvertError> {
    let out = &decorr_core::io::output_file(out)?;
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let io = |source| ConvertError::Io {
        path: out.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(io)?;
    decorr_core::io::remove_stale_temps(&dir, 0);
    let tmp = decorr_core::io::temp_file_in(&dir).map_err(io)?;
    tensor::write_safetensors(tmp.path(), tensors)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(out).map_err(|e| io(e.error))?;
    decorr_core::io::make_readable(out)?;
    Ok(())
}
