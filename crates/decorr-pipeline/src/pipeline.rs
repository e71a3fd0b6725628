//! Stable Diffusion text-to-image as diffusers' `StableDiffusionPipeline` runs it: prompt and
//! negative prompt through the CLIP text encoder (77 tokens, `last_hidden_state`), Gaussian
//! latents from torch's CPU generator (image k of a batch from seed N + k, i.e. diffusers with a
//! list of generators), the scheduler loop with classifier-free guidance, VAE decode. The
//! `decorrelated` guidance (METHOD.md, Eq. 6) takes the conditional embedding from the fine-tuned
//! encoder and the unconditional one from the pre-trained encoder.
//!
//! SDXL (`StableDiffusionXLPipeline`), detected from the checkpoint (a `text_encoder_2`): the
//! UNet's context is both encoders' `hidden_states[-2]` side by side, its added conditions the
//! second encoder's projected pooled embedding and the time ids (original size, crop, target
//! size); with `force_zeros_for_empty_prompt` an empty negative prompt is zeros, not an
//! encoding of "".

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{Device, Int, Tensor, TensorData};
use decorr_clip::{
    ClipTextConfig, ClipTextModel, ClipTokenizer, load_text_encoder, load_text_encoder_dir,
    load_tokenizer,
};
use decorr_core::readback::{all_finite, to_f32_vec};
use decorr_core::{ModelFile, ModelSource, Precision, cast_module};
use decorr_scheduler::{BuildOptions, SchedulerConfig, SchedulerError, SchedulerKind, build_with};
use decorr_unet::{
    AttentionOptions, AutoencoderKL, Capture, UNet2DConditionModel, UNetConfig, VaeConfig,
    load_unet, load_vae,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::PipelineError;
use crate::guidance::attend_excite::{self, AttendExcite};
use crate::guidance::cfg::Cfg;
use crate::guidance::pag::Pag;
use crate::guidance::{AddedEmbeddings, Embeddings, ExciteStep, Guidance, StepContext, Strategy};
use crate::rng::{TorchGenerator, randn_tensor_batch};

/// A fine-tuned text encoder (what `decorr finetune` writes to `OUT/text_encoder`), loaded by
/// [`StableDiffusion::load_tuned_encoder`]. On SDXL, the fine-tuned encoders of `OUT/encoder-1/`
/// and `OUT/encoder-2/`: an encoder that was not fine-tuned is the checkpoint's own.
#[derive(Clone)]
pub struct TunedEncoder {
    /// The (first) text encoder.
    pub model: ClipTextModel,
    /// SDXL's second text encoder (`None` for SD 1.x/2.x).
    pub model_2: Option<ClipTextModel>,
    /// The weights file read (SDXL: the first of the fine-tuned ones).
    pub path: PathBuf,
    /// SHA-256 of its weights file, recorded with every image so results can be traced (SDXL
    /// with both encoders fine-tuned: the two, joined by `+`).
    pub sha256: String,
}

impl std::fmt::Debug for TunedEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunedEncoder")
            .field("path", &self.path)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// The text side of a request: which encoder gives each branch's embedding. Part of the
/// request, so that one loaded checkpoint serves every method without being changed.
#[derive(Debug, Clone, Default)]
pub enum TextSide {
    /// Both branches from the checkpoint's (pre-trained) encoder.
    #[default]
    Pretrained,
    /// METHOD.md Eq. 6: the conditional embedding from the fine-tuned encoder, the
    /// unconditional one from the pre-trained encoder.
    Decorrelated(TunedEncoder),
    /// Both branches from the fine-tuned encoder (the fine-tuned model under plain guidance).
    Tuned(TunedEncoder),
}

impl TextSide {
    /// The fine-tuned encoder, when one takes part.
    pub fn tuned(&self) -> Option<&TunedEncoder> {
        match self {
            TextSide::Pretrained => None,
            TextSide::Decorrelated(t) | TextSide::Tuned(t) => Some(t),
        }
    }
}

/// SDXL's second text encoder and tokenizer, and the pipeline setting that goes with them.
#[derive(Clone)]
pub struct XlText {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub text_config: ClipTextConfig,
    /// `model_index.json`'s `force_zeros_for_empty_prompt` (true for SDXL base): an empty
    /// negative prompt gives zero embeddings.
    pub force_zeros_for_empty_prompt: bool,
}

/// A loaded checkpoint, ready to generate. Cloning shares the weights' buffers (a variant with
/// a few tensors replaced, such as a DisenDiff delta, costs only those).
#[derive(Clone)]
pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub text_config: ClipTextConfig,
    /// SDXL's second encoder (`None` for SD 1.x/2.x).
    pub xl: Option<XlText>,
    pub unet: UNet2DConditionModel,
    pub unet_config: UNetConfig,
    pub vae: AutoencoderKL,
    pub vae_config: VaeConfig,
    pub scheduler_config: SchedulerConfig,
    /// The model id or folder, as the user named it.
    pub model_id: String,
    pub device: Device,
    /// The precision the text encoders and the UNet run in ([`Self::with_precision`]); the VAE
    /// always decodes in f32, and the latents, the scheduler and the guidance stay f32.
    pub precision: Precision,
    /// Waits for the device after the text encoding and after every denoising step, so that
    /// [`Generated::timings`] are the device's times (a GPU otherwise runs behind the host,
    /// and the loop never waits on it). For benchmarks (`decorr generate --timings`).
    pub timed: bool,
}

/// One generation request (a batch of images of one prompt).
#[derive(Debug, Clone, Serialize)]
pub struct GenerateParams {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance_scale: f64,
    pub width: usize,
    pub height: usize,
    pub scheduler: SchedulerKind,
    /// The sampling-side method and its settings.
    pub guidance: Guidance,
    /// Which encoder encodes which branch.
    #[serde(skip)]
    pub text: TextSide,
    /// Karras sigmas override (euler, dpmpp-2m, lms).
    pub karras: Option<bool>,
    /// DDIM's eta.
    pub eta: f64,
    /// Attention computed in slices of this many (batch x head) rows.
    #[serde(skip)]
    pub attention_slice: Option<usize>,
    /// Token indices whose cross-attention maps are recorded at every step (figure 3).
    #[serde(skip)]
    pub capture_tokens: Vec<usize>,
}

/// Cross-attention of the recorded tokens at one denoising step, for each image of the batch:
/// `maps[image][token]` is `height x width` row-major, averaged over heads and over the UNet's
/// attention modules at that resolution (the conditional branch).
#[derive(Debug, Clone)]
pub struct StepAttention {
    pub step: usize,
    pub timestep: f64,
    pub height: usize,
    pub width: usize,
    pub maps: Vec<Vec<Vec<f32>>>,
}

/// One denoising step's latents, as [`StableDiffusion::generate_traced`] keeps them.
#[derive(Debug, Clone)]
pub struct StepTrace {
    /// What the scheduler stepped from (after any update the guidance made: Attend-and-Excite).
    pub input: Tensor<4>,
    /// The scheduler's result.
    pub output: Tensor<4>,
}

/// What [`StableDiffusion::generate`] returns.
pub struct Generated {
    /// `[batch, 3, height, width]` in [0, 1] (diffusers' `output_type="np"` before quantising).
    pub images: Tensor<4>,
    /// The initial latents (before `init_noise_sigma`), as `torch.randn` drew them.
    pub init_latents: Tensor<4>,
    /// The latents handed to the VAE (before `1 / scaling_factor`).
    pub latents: Tensor<4>,
    pub attention: Vec<StepAttention>,
    /// The scheduler's timesteps (one step each).
    pub timesteps: Vec<f64>,
    /// Attend-and-Excite's losses and updates per step and image (empty for other methods).
    pub excite: Vec<ExciteStep>,
    /// Wall-clock seconds of each phase (the device's only when [`StableDiffusion::timed`]).
    pub timings: Timings,
}

/// Wall-clock seconds of one [`StableDiffusion::generate`] call.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    /// The prompt (and negative prompt) through the text encoder(s).
    pub encode_s: f64,
    /// Each denoising step (all UNet calls of the step and the scheduler's update).
    pub step_s: Vec<f64>,
    /// The VAE decode and the finiteness checks.
    pub decode_s: f64,
    /// The whole call.
    pub total_s: f64,
}

impl StableDiffusion {
    /// Loads tokenizer, text encoder, UNet, VAE and scheduler config of `source`, and checks that
    /// they fit together.
    pub fn load(source: &ModelSource, device: &Device) -> Result<Self, PipelineError> {
        let tokenizer = load_tokenizer(source)?;
        let enc = load_text_encoder(source, device)?;
        let unet = load_unet(source, device)?;
        let vae = load_vae(source, device)?;
        let sched_file = source.find_file("scheduler", &["scheduler_config.json"])?;
        // Read through decorr-core on disk too: a regular file of at most 16 MiB of text.
        let scheduler_config = SchedulerConfig::from_json_str(&sched_file.read_to_string()?)
            .map_err(|e| match e {
                SchedulerError::Config(m) => SchedulerError::Config(format!("{sched_file}: {m}")),
                other => other,
            })?;
        let xl = load_xl(source, device, &enc.config, &unet)?;
        if xl.is_none() {
            check_fit(&enc.config, &enc.config_path, &unet.config)?;
        }
        let lat = vae.config.latent_channels;
        if unet.config.in_channels != lat || unet.config.out_channels != lat {
            return Err(PipelineError::Input(format!(
                "the UNet ({}) has in_channels = {} and out_channels = {} but the VAE ({}) has \
                 latent_channels = {lat}: they must be equal (text-to-image UNets take and give \
                 the VAE's latents)",
                unet.config_path,
                unet.config.in_channels,
                unet.config.out_channels,
                vae.config_path
            )));
        }
        Ok(StableDiffusion {
            tokenizer,
            text_encoder: enc.model,
            text_config: enc.config,
            xl,
            unet: unet.model,
            unet_config: unet.config,
            vae: vae.model,
            vae_config: vae.config,
            scheduler_config,
            model_id: source.describe(),
            device: device.clone(),
            precision: Precision::F32,
            timed: false,
        })
    }

    /// Runs the text encoders and the UNet in `precision` (their norms stay f32). The VAE stays
    /// f32: one decode per image costs little, and half precision is where a VAE overflows.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.text_encoder = cast_module(self.text_encoder, precision);
        self.xl = self.xl.take().map(|xl| XlText {
            text_encoder: cast_module(xl.text_encoder, precision),
            ..xl
        });
        self.unet = cast_module(self.unet, precision);
        self.precision = precision;
        self
    }

    /// Loads the fine-tuned encoder at `dir` (`OUT/text_encoder` of `decorr finetune`, or
    /// `OUT`), in this pipeline's precision, checked against the checkpoint.
    pub fn load_tuned_encoder(&self, dir: &Path) -> Result<TunedEncoder, PipelineError> {
        if let Some(xl) = &self.xl {
            return self.load_tuned_xl(xl, dir);
        }
        let folder = if dir.join("config.json").is_file() {
            dir.to_path_buf()
        } else if dir.join("text_encoder").is_dir() {
            dir.join("text_encoder")
        } else {
            return Err(PipelineError::Input(format!(
                "--encoder {}: no fine-tuned text encoder there (expected config.json and \
                 model.safetensors, as `decorr finetune --out OUT` writes to OUT/text_encoder)",
                dir.display()
            )));
        };
        let (model, path, sha256) = self.load_tuned_one(&folder, &self.text_config, |c, f| {
            check_fit(c, f, &self.unet_config)
        })?;
        Ok(TunedEncoder {
            model: model.0,
            model_2: None,
            path,
            sha256,
        })
    }

    /// SDXL's fine-tuned encoders in `dir` (`decorr finetune`'s `OUT`: `encoder-1/text_encoder`
    /// and/or `encoder-2/text_encoder`); the one not there is the checkpoint's own.
    fn load_tuned_xl(&self, xl: &XlText, dir: &Path) -> Result<TunedEncoder, PipelineError> {
        let found = |n: usize| {
            let f = dir.join(format!("encoder-{n}")).join("text_encoder");
            f.join("config.json").is_file().then_some(f)
        };
        let (first, second) = (found(1), found(2));
        if first.is_none() && second.is_none() {
            return Err(PipelineError::Input(format!(
                "--encoder {}: no fine-tuned SDXL text encoder there (expected \
                 encoder-1/text_encoder or encoder-2/text_encoder, as `decorr finetune --out OUT` \
                 writes them for an SDXL checkpoint)",
                dir.display()
            )));
        }
        let mut shas = Vec::new();
        let mut path = None;
        let mut load = |folder: Option<PathBuf>, config: &ClipTextConfig| {
            folder
                .map(|f| {
                    let (m, p, sha) = self.load_tuned_one(&f, config, |c, file| {
                        if c.hidden_size != config.hidden_size {
                            return Err(PipelineError::Input(format!(
                                "the fine-tuned encoder at {file} is {}-wide, the checkpoint's \
                                 {}: it was not fine-tuned from this model",
                                c.hidden_size, config.hidden_size
                            )));
                        }
                        Ok(())
                    })?;
                    path.get_or_insert(p);
                    shas.push(sha);
                    Ok::<_, PipelineError>(m.0)
                })
                .transpose()
        };
        let model = load(first, &self.text_config)?.unwrap_or_else(|| self.text_encoder.clone());
        let model_2 = load(second, &xl.text_config)?.unwrap_or_else(|| xl.text_encoder.clone());
        Ok(TunedEncoder {
            model,
            model_2: Some(model_2),
            path: path.expect("one was loaded"),
            sha256: shas.join("+"),
        })
    }

    /// One fine-tuned encoder folder, in this pipeline's precision: the model, its config and
    /// config file, the weights file and their SHA-256. `fits` checks its config (and names
    /// its file) before the vocabulary is compared with `base`'s.
    #[allow(clippy::type_complexity)]
    fn load_tuned_one(
        &self,
        folder: &Path,
        base: &ClipTextConfig,
        fits: impl FnOnce(&ClipTextConfig, &ModelFile) -> Result<(), PipelineError>,
    ) -> Result<((ClipTextModel, ClipTextConfig, ModelFile), PathBuf, String), PipelineError> {
        let enc = load_text_encoder_dir(folder, &self.device)?;
        fits(&enc.config, &enc.config_path)?;
        if enc.config.vocab_size != base.vocab_size {
            return Err(PipelineError::Input(format!(
                "the fine-tuned encoder at {} has a vocabulary of {} tokens, the checkpoint's \
                 {}: it was not fine-tuned from this model",
                enc.config_path.display(),
                enc.config.vocab_size,
                base.vocab_size
            )));
        }
        let bytes = enc.weights_path.read_bytes()?;
        let sha256 = format!("{:x}", Sha256::digest(&bytes));
        Ok((
            (
                cast_module(enc.model, self.precision),
                enc.config,
                enc.config_path,
            ),
            enc.weights_path.error_path(),
            sha256,
        ))
    }

    /// Pixels per latent pixel (8 for SD; `2^(blocks-1)` of the VAE).
    pub fn vae_scale_factor(&self) -> usize {
        1 << (self.vae_config.block_out_channels.len() - 1)
    }

    /// The checkpoint's own scheduler (from `_class_name`).
    pub fn default_scheduler(&self) -> Result<SchedulerKind, PipelineError> {
        Ok(self.scheduler_config.kind()?)
    }

    /// The default image side: the UNet's `sample_size` times the VAE's factor, refused (naming
    /// the config key, not a flag) when it is not a usable size.
    pub fn default_side(&self) -> Result<usize, PipelineError> {
        let (n, s) = (self.unet_config.sample_size, self.vae_scale_factor());
        let side = n * s;
        if n == 0 || !side.is_multiple_of(8) || side > MAX_SIDE {
            return Err(PipelineError::Input(format!(
                "the UNet config's `sample_size` = {n} gives a default image side of {side} px \
                 (x {s}, the VAE's factor), which is not a multiple of 8 in 8..={MAX_SIDE}; pass \
                 --width and --height"
            )));
        }
        Ok(side)
    }

    /// The latent's `[height, width]` for `p`'s image size.
    pub fn latent_hw(&self, p: &GenerateParams) -> [usize; 2] {
        let s = self.vae_scale_factor();
        [p.height / s, p.width / s]
    }

    /// Checks sizes, steps and guidance before any work is done.
    pub fn check(&self, p: &GenerateParams) -> Result<(), PipelineError> {
        let bad = |m: String| Err(PipelineError::Input(m));
        let s = self.vae_scale_factor();
        for (name, v) in [("width", p.width), ("height", p.height)] {
            if v == 0 || v % 8 != 0 || v % s != 0 {
                return bad(format!(
                    "--{name} {v}: must be a positive multiple of 8 (and of the VAE's factor {s}); \
                     e.g. {}",
                    (v.max(8) / 8) * 8
                ));
            }
            if v > MAX_SIDE {
                return bad(format!("--{name} {v}: at most {MAX_SIDE} pixels"));
            }
        }
        if p.steps == 0 {
            return bad("--steps must be at least 1".into());
        }
        if !(p.guidance_scale.is_finite() && (0.0..=MAX_GUIDANCE_SCALE).contains(&p.guidance_scale))
        {
            return bad(format!(
                "--guidance-scale {}: must be a finite number in [0, {MAX_GUIDANCE_SCALE}] (7.5 is \
                 usual; 1 or less turns guidance off)",
                p.guidance_scale
            ));
        }
        match &p.guidance {
            Guidance::Pag(pag) => {
                pag.modules(&self.unet)?;
            }
            Guidance::AttendAndExcite(excite) => {
                let tok = self.tokenizer.encode(&p.prompt)?;
                attend_excite::check(&self.unet, excite, self.latent_hw(p), tok.ids.len())?;
            }
            Guidance::Cfg => {}
        }
        Ok(())
    }

    /// Memory the activations of generating `batch` images at once need, roughly (bytes): the
    /// latents, the largest attention map that is materialised (none on flex, whose attention
    /// works in blocks of query rows; on GPU backends `--attention-slice` rows of it), the UNet's
    /// skip connections and working feature maps, Attend-and-Excite's gradient pass, and the
    /// VAE decoder's largest feature maps.
    pub fn activation_bytes(&self, p: &GenerateParams, batch: usize) -> u128 {
        let u = &self.unet_config;
        let s = self.vae_scale_factor() as u128;
        let (h, w) = (p.height as u128 / s, p.width as u128 / s);
        let batch = batch.max(1) as u128;
        // UNet rows per call: the unconditional and conditional branches, and PAG's perturbed one.
        let rows = batch
            * (if p.guidance_scale > 1.0 { 2 } else { 1 }
                + u128::from(p.guidance.pag().is_some_and(|pag| pag.scale > 0.0)));
        // Spatial size at UNet level i (each down block halves, rounding up).
        let at = |i: usize| h.div_ceil(1 << i) * w.div_ceil(1 << i);
        let levels = u.block_out_channels.len();
        let latents = 3 * rows * u.in_channels as u128 * at(0);
        let skips: u128 = (0..levels)
            .map(|i| {
                (u.layers_per_block.get(i) as u128 + 1) * u.block_out_channels[i] as u128 * at(i)
            })
            .sum::<u128>()
            * rows;
        let working = 6 * rows * u.block_out_channels[0] as u128 * at(0);
        let materialised = self.device != Device::flex();
        let sliced = |r: u128| p.attention_slice.map_or(r, |sl| r.min(sl.max(1) as u128));
        let mut attention = 0u128;
        if materialised {
            for (i, kind) in u.down_block_types.iter().enumerate() {
                if kind.starts_with("CrossAttn") || (i + 1 == levels && u.mid_block_type.is_some())
                {
                    attention = attention.max(sliced(rows * u.heads(i) as u128) * at(i) * at(i));
                }
            }
            // The VAE's mid-block attention: one head over every latent pixel.
            attention = attention.max(sliced(batch) * at(0) * at(0));
        }
        // Attend-and-Excite's gradient pass (batch 1) keeps its forward for the backward: the
        // feature maps, and the self-attention scores and probabilities of the first level,
        // which autodiff materialises on every backend.
        let excite = if p.guidance.excite().is_some() {
            let layers0 = if u.down_block_types[0].starts_with("CrossAttn") {
                u.layers_per_block.get(0) as u128 * u.transformer_layers_per_block.get(0) as u128
            } else {
                0
            };
            3 * (skips + working) / rows + 2 * layers0 * u.heads(0) as u128 * at(0) * at(0)
        } else {
            0
        };
        let v = &self.vae_config.block_out_channels;
        let vae = (0..v.len())
            .map(|j| {
                // Decoder level j from the top: ch[j] channels at 1/2^j of the image.
                let (hh, ww) = ((h * s).div_ceil(1 << j), (w * s).div_ceil(1 << j));
                v[j] as u128 * hh * ww
            })
            .max()
            .unwrap_or(0)
            * 3
            * batch;
        4 * (latents + skips + working + attention + excite + vae)
    }

    /// Refuses a size and batch whose activations ([`Self::activation_bytes`]) would not fit in
    /// the memory available (`decorr_core::limits`), naming the flags.
    pub fn check_memory(&self, p: &GenerateParams, batch: usize) -> Result<(), PipelineError> {
        let bytes = self.activation_bytes(p, batch);
        decorr_core::limits::check_memory(
            bytes,
            &format!(
                "generating {batch} image(s) of {}x{} px at once (--width {} --height {}, \
                 --batch-size {batch})",
                p.width, p.height, p.width, p.height
            ),
            "lower --width/--height (by default the UNet's sample_size x 8) or --batch-size, or \
             on a GPU backend pass --attention-slice",
        )?;
        Ok(())
    }

    /// `last_hidden_state` of `text` `[1, 77, hidden]`. Refused when it is not finite (one
    /// boolean read back per prompt).
    pub fn encode(&self, encoder: &ClipTextModel, text: &str) -> Result<Tensor<3>, PipelineError> {
        let tok = self.tokenizer.encode(text)?;
        encoder.check_ids(&tok.ids)?;
        let ids: Vec<i64> = tok.ids.iter().map(|&i| i as i64).collect();
        let n = ids.len();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &self.device);
        let hidden = encoder.forward(ids);
        if !all_finite(&hidden) {
            return Err(PipelineError::NonFinite(format!(
                "the text encoder's hidden states for {text:?} hold NaN or infinity: its weights \
                 are not finite or overflow (a fine-tuning that diverged, an fp16 overflow)"
            )));
        }
        Ok(hidden)
    }

    /// SDXL's context `[1, 77, d1 + d2]` (each encoder's `hidden_states[-2]`) and pooled
    /// embedding `[1, P]` of `text`, with `encoder` and `encoder_2` as the two encoders (the
    /// checkpoint's, or fine-tuned ones). Refused when not finite.
    pub fn encode_xl(
        &self,
        encoder: &ClipTextModel,
        encoder_2: &ClipTextModel,
        xl: &XlText,
        text: &str,
    ) -> Result<(Tensor<3>, Tensor<2>), PipelineError> {
        let ids1 = self.tokenizer.encode(text)?.ids;
        let ids2 = xl.tokenizer.encode(text)?.ids;
        let first = encoder.sdxl_conditioning(&[ids1], 0)?;
        let second = encoder_2.sdxl_conditioning(&[ids2], 0)?;
        let pooled = second.text_embeds.ok_or_else(|| {
            PipelineError::Input(
                "text_encoder_2 has no text_projection: SDXL's second encoder is a \
                 CLIPTextModelWithProjection"
                    .into(),
            )
        })?;
        let context = Tensor::cat(vec![first.hidden, second.hidden], 2);
        if !all_finite(&context) || !all_finite(&pooled) {
            return Err(PipelineError::NonFinite(format!(
                "the text encoders' hidden states for {text:?} hold NaN or infinity: their \
                 weights are not finite or overflow (an fp16 overflow)"
            )));
        }
        Ok((context, pooled))
    }

    /// Generates one image per seed (image k from `torch.Generator().manual_seed(seeds[k])`).
    /// `on_step` is called after each denoising step with (done, total); returning `false`
    /// stops the run with [`PipelineError::Interrupted`] (Ctrl-C, without waiting for the images).
    pub fn generate(
        &self,
        p: &GenerateParams,
        seeds: &[u64],
        on_step: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Generated, PipelineError> {
        self.generate_traced(p, seeds, on_step, None)
    }

    /// [`Self::generate`], also keeping every step's latents in `trace` (for parity tests and
    /// analysis; each entry stays on the device).
    pub fn generate_traced(
        &self,
        p: &GenerateParams,
        seeds: &[u64],
        on_step: &mut dyn FnMut(usize, usize) -> bool,
        mut trace: Option<&mut Vec<StepTrace>>,
    ) -> Result<Generated, PipelineError> {
        self.check(p)?;
        assert!(!seeds.is_empty(), "at least one seed");
        self.check_memory(p, seeds.len())?;
        let started = Instant::now();
        let mut timings = Timings::default();
        let wait = || {
            if self.timed {
                // An execution error surfaces again at the next read-back.
                self.device.sync().ok();
            }
        };
        let b = seeds.len();
        // The text side: which encoder gives each branch (Eq. 6 pairs the fine-tuned
        // conditional with the pre-trained unconditional).
        // (first encoder, SDXL's second)
        let pretrained = (
            &self.text_encoder,
            self.xl.as_ref().map(|xl| &xl.text_encoder),
        );
        let (cond_encoder, uncond_encoder) = match &p.text {
            TextSide::Pretrained => (pretrained, pretrained),
            TextSide::Decorrelated(t) => {
                ((&t.model, t.model_2.as_ref().or(pretrained.1)), pretrained)
            }
            TextSide::Tuned(t) => {
                let tuned = (&t.model, t.model_2.as_ref().or(pretrained.1));
                (tuned, tuned)
            }
        };
        let cfg = p.guidance_scale > 1.0; // diffusers skips the unconditional branch otherwise
        let emb = match &self.xl {
            None => Embeddings {
                cond: self.encode(cond_encoder.0, &p.prompt)?,
                uncond: if cfg {
                    Some(self.encode(uncond_encoder.0, &p.negative_prompt)?)
                } else {
                    None
                },
                added: None,
            },
            Some(xl) => {
                let (cond, cond_pooled) = self.encode_xl(
                    cond_encoder.0,
                    cond_encoder.1.unwrap_or(&xl.text_encoder),
                    xl,
                    &p.prompt,
                )?;
                let uncond = if !cfg {
                    None
                } else if p.negative_prompt.is_empty() && xl.force_zeros_for_empty_prompt {
                    Some((cond.zeros_like(), cond_pooled.zeros_like()))
                } else {
                    Some(self.encode_xl(
                        uncond_encoder.0,
                        uncond_encoder.1.unwrap_or(&xl.text_encoder),
                        xl,
                        &p.negative_prompt,
                    )?)
                };
                let (uncond, uncond_pooled) = uncond.unzip();
                Embeddings {
                    cond,
                    uncond,
                    added: Some(AddedEmbeddings {
                        cond_pooled,
                        uncond_pooled,
                        time_ids: time_ids(p, &self.device),
                    }),
                }
            }
        };
        wait();
        timings.encode_s = started.elapsed().as_secs_f64();

        let mut scheduler = build_with(
            p.scheduler,
            &self.scheduler_config,
            p.steps,
            &BuildOptions {
                karras: p.karras,
                eta: p.eta,
            },
        )?;
        let s = self.vae_scale_factor();
        let shape = [b, self.unet_config.in_channels, p.height / s, p.width / s];
        let mut strategy: Box<dyn Strategy> = match &p.guidance {
            Guidance::Cfg => Box::new(Cfg::new(&emb, b, p.guidance_scale)),
            Guidance::Pag(pag) => Box::new(Pag::new(&self.unet, &emb, b, p.guidance_scale, pag)?),
            Guidance::AttendAndExcite(excite) => Box::new(AttendExcite::new(
                &self.unet,
                &emb,
                b,
                p.guidance_scale,
                excite,
                self.latent_hw(p),
            )?),
        };
        let mut gens: Vec<TorchGenerator> = seeds.iter().map(|&s| TorchGenerator::new(s)).collect();
        let init = randn_tensor_batch(&mut gens, shape, &self.device);
        let mut latents = init.clone().mul_scalar(scheduler.init_noise_sigma());

        let opts = AttentionOptions {
            slice_size: p.attention_slice,
            // Only the modules figure 3 averages: every other attention keeps the fused kernel.
            capture_cross: if p.capture_tokens.is_empty() {
                Capture::None
            } else {
                Capture::Prefixes(figure_sites(&self.unet, [shape[2], shape[3]]))
            },
            ..Default::default()
        };
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len();
        let mut attention = Vec::new();
        for i in 0..total {
            let step_started = Instant::now();
            let ctx = StepContext {
                unet: &self.unet,
                scheduler: scheduler.as_ref(),
                index: i,
                total,
                timestep: scheduler.model_timestep(i),
                opts: &opts,
            };
            let pred = strategy.predict(&ctx, &mut latents)?;
            let input = trace.is_some().then(|| latents.clone());
            if !p.capture_tokens.is_empty() {
                attention.push(step_attention(
                    &pred.cross_attention,
                    i,
                    ctx.timestep,
                    b,
                    &p.capture_tokens,
                ));
            }
            let noise = scheduler
                .needs_noise()
                .then(|| randn_tensor_batch(&mut gens, shape, &self.device));
            latents = scheduler.step(pred.eps, i, latents, noise)?;
            if let (Some(trace), Some(input)) = (trace.as_deref_mut(), input) {
                trace.push(StepTrace {
                    input,
                    output: latents.clone(),
                });
            }
            wait();
            timings.step_s.push(step_started.elapsed().as_secs_f64());
            if !on_step(i + 1, total) {
                return Err(PipelineError::Interrupted);
            }
        }
        let decode_started = Instant::now();
        // Checked once, not per step: a per-step read-back would stall the GPU at every step.
        if !all_finite(&latents) {
            return Err(PipelineError::NonFinite(format!(
                "the latents after the last of {total} denoising steps hold NaN or infinity, so \
                 the image would be one colour; likely causes: a guidance scale too high \
                 (--guidance-scale {}), non-finite UNet weights, or an fp16 overflow",
                p.guidance_scale
            )));
        }
        let decoded = self.vae.decode(
            latents.clone().div_scalar(self.vae_config.scaling_factor),
            p.attention_slice,
        );
        if !all_finite(&decoded) {
            return Err(PipelineError::NonFinite(format!(
                "the VAE decoder's output holds NaN or infinity although the latents were finite; \
                 likely causes: non-finite VAE weights, the VAE config's scaling_factor ({}), or \
                 an fp16 overflow in the decoder",
                self.vae_config.scaling_factor
            )));
        }
        let images = decoded.div_scalar(2.0).add_scalar(0.5).clamp(0.0, 1.0);
        timings.decode_s = decode_started.elapsed().as_secs_f64();
        timings.total_s = started.elapsed().as_secs_f64();
        Ok(Generated {
            images,
            init_latents: init,
            latents,
            attention,
            timesteps,
            excite: strategy.excite_log(),
            timings,
        })
    }
}

/// Largest image side, in pixels.
pub const MAX_SIDE: usize = 8192;
/// Largest guidance scale accepted (far above any useful value; f32 maths).
pub const MAX_GUIDANCE_SCALE: f64 = 1000.0;

/// The text encoder's width must be the UNet's cross-attention width in every block.
/// SDXL's micro-conditions of an image of `p`'s size, as diffusers sets them by default:
/// original size = target size = the image's `(height, width)`, crop `(0, 0)`.
fn time_ids(p: &GenerateParams, device: &Device) -> Tensor<2> {
    let (h, w) = (p.height as f32, p.width as f32);
    Tensor::from_data(TensorData::new(vec![h, w, 0.0, 0.0, h, w], [1, 6]), device)
}

/// SDXL's second encoder and tokenizer when the checkpoint has a `text_encoder_2`, checked
/// against the UNet: the two encoders' widths side by side are the cross-attention's, and the
/// pooled width with the time ids' features is what `add_embedding` takes.
fn load_xl(
    source: &ModelSource,
    device: &Device,
    text1: &ClipTextConfig,
    unet: &decorr_unet::Loaded<UNet2DConditionModel, UNetConfig>,
) -> Result<Option<XlText>, PipelineError> {
    let has_second = source
        .find_file_opt("text_encoder_2", &["config.json"])?
        .is_some();
    let dims = unet.model.text_time_dims();
    let (dims, true) = (dims, has_second) else {
        if dims.is_some() {
            return Err(PipelineError::Input(format!(
                "the UNet ({}) takes SDXL's added conditions (addition_embed_type text_time) \
                 but the checkpoint has no text_encoder_2: an SDXL checkpoint needs both text \
                 encoders and tokenizers",
                unet.config_path
            )));
        }
        return Ok(None);
    };
    let Some(dims) = dims else {
        return Err(PipelineError::Input(format!(
            "the checkpoint has a text_encoder_2 (SDXL) but its UNet ({}) has no text_time \
             addition embedding; a UNet from another model family?",
            unet.config_path
        )));
    };
    let enc = decorr_clip::load_text_encoder_component(source, "text_encoder_2", device)?;
    let tokenizer = decorr_clip::load_tokenizer_component(source, "tokenizer_2")?;
    let width = text1.hidden_size + enc.config.hidden_size;
    let cross = unet.config.cross_attention_dim.get(0);
    if width != cross {
        return Err(PipelineError::Input(format!(
            "the text encoders output {} + {} = {width}-wide embeddings side by side but the \
             UNet's cross-attention ({}) expects {cross}: the encoders belong to another model",
            text1.hidden_size, enc.config.hidden_size, unet.config_path
        )));
    }
    // SDXL base's six time ids, each a sinusoid of `time_embed_dim` features, follow the pooled
    // embedding.
    let pooled = enc.config.projection_dim;
    if pooled + 6 * dims.time_embed_dim != dims.input_dim {
        return Err(PipelineError::Input(format!(
            "text_encoder_2 projects to {pooled} and six time ids add 6 x {} features, but the \
             UNet's add_embedding ({}) takes {}: the encoder belongs to another model (or the \
             UNet is a refiner's, which decorr does not run)",
            dims.time_embed_dim, unet.config_path, dims.input_dim
        )));
    }
    let force_zeros = match source.find_file_opt("", &["model_index.json"])? {
        Some(f) => {
            let index: serde_json::Value = serde_json::from_str(&f.read_to_string()?)
                .map_err(|e| PipelineError::Input(format!("{f}: {e}")))?;
            index["force_zeros_for_empty_prompt"]
                .as_bool()
                .unwrap_or(true)
        }
        None => true,
    };
    Ok(Some(XlText {
        tokenizer,
        text_encoder: enc.model,
        text_config: enc.config,
        force_zeros_for_empty_prompt: force_zeros,
    }))
}

fn check_fit(
    text: &ClipTextConfig,
    text_path: &ModelFile,
    unet: &UNetConfig,
) -> Result<(), PipelineError> {
    let blocks = unet.block_out_channels.len();
    if let Some(d) = (0..blocks)
        .map(|i| unet.cross_attention_dim.get(i))
        .find(|&d| d != text.hidden_size)
    {
        return Err(PipelineError::Input(format!(
            "the text encoder {} outputs {}-wide embeddings but the UNet's cross-attention expects \
             {d}: the encoder belongs to another model family (SD 1.x uses 768, SD 2.x 1024)",
            text_path.display(),
            text.hidden_size
        )));
    }
    Ok(())
}

/// The cross-attention modules whose maps [`step_attention`] averages: those at a quarter of
/// the latent's resolution (16x16 for 64x64 latents, as prompt-to-prompt does), or at the
/// resolution with the most of them when the UNet has none there.
fn figure_sites(unet: &UNet2DConditionModel, latent_hw: [usize; 2]) -> Vec<String> {
    let cross: Vec<_> = unet
        .attention_sites(latent_hw)
        .into_iter()
        .filter(|s| s.cross)
        .collect();
    let want = (latent_hw[0].div_ceil(4), latent_hw[1].div_ceil(4));
    let mut sizes: Vec<(usize, usize)> = cross.iter().map(|s| (s.height, s.width)).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let (h, w) = if sizes.contains(&want) {
        want
    } else {
        sizes
            .iter()
            .copied()
            .max_by_key(|s| cross.iter().filter(|c| (c.height, c.width) == *s).count())
            .unwrap_or(want)
    };
    cross
        .into_iter()
        .filter(|s| (s.height, s.width) == (h, w))
        .map(|s| s.path)
        .collect()
}

/// Averages the captured cross-attention maps of one step (conditional rows), captured at the
/// one resolution [`figure_sites`] chose.
fn step_attention(
    maps: &[decorr_unet::AttentionMap],
    step: usize,
    timestep: f64,
    b: usize,
    tokens: &[usize],
) -> StepAttention {
    let first = maps.first().expect("a UNet with cross-attention");
    let (h, w) = (first.height, first.width);
    let mean = maps
        .iter()
        .map(|m| m.probs.clone())
        .reduce(|a, c| a + c)
        .expect("at least one map")
        .div_scalar(maps.len() as f64);
    let [_, hw, keys] = mean.dims();
    let data = to_f32_vec(mean);
    let maps = (0..b)
        .map(|img| {
            tokens
                .iter()
                .map(|&t| {
                    (0..hw)
                        .map(|q| data[(img * hw + q) * keys + t.min(keys - 1)])
                        .collect()
                })
                .collect()
        })
        .collect();
    StepAttention {
        step,
        timestep,
        height: h,
        width: w,
        maps,
    }
}

/// `[batch, 3, h, w]` in [0, 1] to RGB8 images as diffusers quantises: `round(x * 255)`.
pub fn to_rgb8(images: &Tensor<4>) -> Vec<(usize, usize, Vec<u8>)> {
    let [b, c, h, w] = images.dims();
    let data = to_f32_vec(images.clone());
    (0..b)
        .map(|i| {
            let mut px = Vec::with_capacity(h * w * 3);
            for y in 0..h {
                for x in 0..w {
                    for ch in 0..3.min(c) {
                        let v = data[((i * c + ch) * h + y) * w + x];
                        px.push((v * 255.0).round().clamp(0.0, 255.0) as u8);
                    }
                }
            }
            (w, h, px)
        })
        .collect()
}
