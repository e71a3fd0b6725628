//! Fine-tuning runs on disk (`decorr finetune`, `fix`'s and `compare`'s encoders): METHOD.md's
//! fine-tuning with checkpoint selection into OUT, which always holds a consistent result: the
//! selected epoch's `text_encoder/` (transformers naming), `report.json` and the loss curves
//! (`losses.svg`, `losses.png`), each replaced atomically whenever it changes. A stop request
//! ends the run after the current step and keeps what was selected so far; a replaced OUT is
//! built beside the old one and swapped in only when the run succeeds.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use decorr_clip::{ClipTextConfig, ClipTextModel, Tokenized, save_text_encoder};
use decorr_core::ModelSource;
use decorr_core::io::{OutputLock, remove_stale_temps, temp_dir_beside, write_atomic};
use decorr_trainer::{
    EpochMetrics, MethodError, ParamPreset, PromptState, TargetSpec, TrainConfig, TrainObserver,
    TrainPrompt, finetune_prepared, prepare, resolve_target,
};
use serde::{Deserialize, Serialize};

use crate::bail;
use crate::charts::{Series, panels};
use crate::error::{Context, Result, RunsError};
use crate::progress::Progress;

/// The fine-tuning's settings (`decorr finetune`'s flags but the prompts and OUT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneSettings {
    /// Encoder layer (0-based) whose self-attention is decorrelated.
    pub layer: usize,
    pub epochs: usize,
    pub steps_per_epoch: usize,
    pub lr: f64,
    pub weight_decay: f32,
    pub tau: f64,
    pub params: ParamPreset,
    pub seed: u64,
    /// SDXL: the second encoder's layer (`layer` is the first's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_2: Option<usize>,
    /// SDXL: which encoders are fine-tuned; `None`: those whose target row leans on an earlier
    /// token (or, where neither does, the one that leans more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder: Option<EncoderChoice>,
}

/// Which of SDXL's two text encoders to fine-tune (`--encoder 1|2|both`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderChoice {
    #[serde(rename = "1")]
    First,
    #[serde(rename = "2")]
    Second,
    Both,
}

impl EncoderChoice {
    /// The choice that names these encoders (1, 2 or both); `None` for none.
    pub fn of(encoders: &[usize]) -> Option<Self> {
        match (encoders.contains(&1), encoders.contains(&2)) {
            (true, true) => Some(EncoderChoice::Both),
            (true, false) => Some(EncoderChoice::First),
            (false, true) => Some(EncoderChoice::Second),
            (false, false) => None,
        }
    }

    /// The encoders (1, 2) it names.
    pub fn encoders(self) -> Vec<usize> {
        match self {
            EncoderChoice::First => vec![1],
            EncoderChoice::Second => vec![2],
            EncoderChoice::Both => vec![1, 2],
        }
    }
}

impl std::str::FromStr for EncoderChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "1" => Ok(EncoderChoice::First),
            "2" => Ok(EncoderChoice::Second),
            "both" => Ok(EncoderChoice::Both),
            other => Err(format!("`{other}`: expected 1, 2 or both")),
        }
    }
}

/// The default layer of each text encoder of `source`: the last one whose output the UNet
/// reads (SD 1.x/2.x: the last layer; SDXL, whose UNet reads `hidden_states[-2]`: the
/// second-to-last of each encoder). The second is `Some` for SDXL only. Reads the configs only.
pub fn default_layers(source: &ModelSource) -> Result<(usize, Option<usize>)> {
    let layers = |component: &str| -> Result<Option<usize>> {
        let Some(f) = source.find_file_opt(component, &["config.json"])? else {
            return Ok(None);
        };
        let config: ClipTextConfig = serde_json::from_str(&f.read_to_string()?)
            .map_err(|e| RunsError::Msg(format!("{f}: not a text encoder config: {e}")))?;
        Ok(Some(config.num_hidden_layers))
    };
    let first = layers("text_encoder")?.unwrap_or(ClipTextConfig::sd15().num_hidden_layers);
    Ok(match layers("text_encoder_2")? {
        Some(second) => (first.saturating_sub(2), Some(second.saturating_sub(2))),
        None => (first.saturating_sub(1), None),
    })
}

/// SDXL: the layer of each encoder, `[first, second]`: `settings`' own, the second defaulting
/// to the checkpoint's ([`default_layers`]).
pub fn xl_layers(settings: &FinetuneSettings, source: &ModelSource) -> Result<[usize; 2]> {
    let (_, d2) = default_layers(source)?;
    Ok([
        settings.layer,
        settings.layer_2.or(d2).unwrap_or(settings.layer),
    ])
}

/// Whether `source` is an SDXL checkpoint (it has a second text encoder).
pub fn is_xl(source: &ModelSource) -> Result<bool> {
    Ok(source
        .find_file_opt("text_encoder_2", &["config.json"])?
        .is_some())
}

impl Default for FinetuneSettings {
    fn default() -> Self {
        FinetuneSettings {
            layer: 11,
            epochs: 20,
            steps_per_epoch: 10,
            lr: 1e-5,
            weight_decay: 0.01,
            tau: 5.0,
            params: ParamPreset::All,
            seed: 0,
            layer_2: None,
            encoder: None,
        }
    }
}

/// One fine-tuning into a folder.
pub struct FinetuneJob<'a> {
    pub source: &'a ModelSource,
    pub device: &'a Device,
    /// The pre-trained tokenizer and encoder when the caller has them loaded in f32 (`fix`,
    /// `compare`); else they are loaded from `source`.
    pub pretrained: Option<Pretrained>,
    /// SDXL: the same for the second encoder.
    pub pretrained_2: Option<Pretrained>,
    pub prompts: Vec<String>,
    /// One per prompt.
    pub targets: Vec<TargetSpec>,
    pub settings: FinetuneSettings,
    pub out: PathBuf,
    /// Replace an existing OUT (only one that `decorr finetune` wrote).
    pub overwrite: bool,
}

/// A loaded pre-trained tokenizer and text encoder (f32), to fine-tune without loading again.
/// Cloning shares the weights; training never writes into them.
#[derive(Clone)]
pub struct Pretrained {
    pub tokenizer: decorr_clip::ClipTokenizer,
    pub encoder: decorr_clip::ClipTextModel,
    pub config: decorr_clip::ClipTextConfig,
}

impl Pretrained {
    /// The pipeline's tokenizer and encoder, when it runs in f32 (fine-tuning does; a pipeline
    /// loaded for f16/bf16 sampling holds a cast copy, so `None`: the job loads f32 weights).
    pub fn of(sd: &decorr_pipeline::StableDiffusion) -> Option<Pretrained> {
        (sd.precision == decorr_core::Precision::F32).then(|| Pretrained {
            tokenizer: sd.tokenizer.clone(),
            encoder: sd.text_encoder.clone(),
            config: sd.text_config.clone(),
        })
    }

    /// SDXL's second tokenizer and encoder of the pipeline, as [`Self::of`].
    pub fn of_second(sd: &decorr_pipeline::StableDiffusion) -> Option<Pretrained> {
        let xl = sd.xl.as_ref()?;
        (sd.precision == decorr_core::Precision::F32).then(|| Pretrained {
            tokenizer: xl.tokenizer.clone(),
            encoder: xl.text_encoder.clone(),
            config: xl.text_config.clone(),
        })
    }
}

/// How a fine-tuning ended (errors aside).
pub enum FinetuneOutcome {
    /// OUT holds the selected epoch (also after a stop, in a fresh OUT).
    Done {
        selected: usize,
        interrupted: bool,
        /// Per prompt: (prompt, A[t,c]/A[t,t] before, after).
        ratios: Vec<(String, f32, f32)>,
    },
    /// SDXL: each fine-tuned encoder's outcome (1 or 2), in `OUT/encoder-N/`.
    Encoders(Vec<(usize, FinetuneOutcome)>),
    /// Stopped before the first epoch ended; a fresh OUT was removed.
    NothingSelected,
    /// A replacing run was stopped: it was discarded and the previous OUT is unchanged.
    Discarded,
}

impl FinetuneOutcome {
    /// Whether every fine-tuning ran to its end (not stopped, something selected).
    pub fn complete(&self) -> bool {
        match self {
            FinetuneOutcome::Done { interrupted, .. } => !interrupted,
            FinetuneOutcome::Encoders(each) => each.iter().all(|(_, o)| o.complete()),
            FinetuneOutcome::NothingSelected | FinetuneOutcome::Discarded => false,
        }
    }
}

/// The finished fine-tuning in `out`, if there is one: its report says so and every file the
/// pages link is there (the encoder, the loss curves). `losses.svg` is not required: folders
/// written before it existed stay reusable, and the pages fall back to `losses.png`.
pub fn finished(out: &Path) -> Option<FinetuneReport> {
    let report = FinetuneReport::read(out).ok()?;
    let complete = [
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "losses.png",
    ]
    .iter()
    .all(|f| out.join(f).is_file());
    (report.finished && complete).then_some(report)
}

/// A token of a prompt: its index in the padded sequence (BOS is 0) and its text.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRef {
    pub index: usize,
    pub text: String,
}

/// One prompt of a fine-tuning run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptReport {
    pub prompt: String,
    /// The real tokens (BOS to the first EOS), as the rows below index them.
    pub tokens: Vec<String>,
    pub target: TokenRef,
    pub corr: TokenRef,
    #[serde(default)]
    pub s: Vec<TokenRef>,
    /// Row `t` of `A_pre` (real tokens).
    pub row_before: Vec<f32>,
    /// Row `t` of `A_ft` at the selected epoch.
    pub row_after: Option<Vec<f32>>,
}

impl PromptReport {
    /// `A[t,c] / A[t,t]` of a row (before or after), the number the fine-tuning lowers.
    pub fn ratio(&self, row: &[f32]) -> Option<f64> {
        let (c, t) = (row.get(self.corr.index)?, row.get(self.target.index)?);
        Some(*c as f64 / *t as f64)
    }
}

/// `OUT/report.json` of a fine-tuning: written as the run goes and read back (by `fix`,
/// `compare` and resumes) through this one type.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneReport {
    /// The checkpoint it fine-tuned.
    pub model: String,
    pub config: TrainConfig,
    pub prompts: Vec<PromptReport>,
    pub epochs: Vec<EpochMetrics>,
    pub selected_epoch: Option<usize>,
    #[serde(default)]
    pub step_losses: Vec<f64>,
    pub finished: bool,
}

impl FinetuneReport {
    /// The report's file name in a fine-tuning folder.
    pub const FILE: &'static str = "report.json";

    /// Reads `dir/report.json`.
    pub fn read(dir: &Path) -> Result<FinetuneReport> {
        let path = dir.join(Self::FILE);
        let text = decorr_core::input::read_text(&path, "a fine-tuning report")?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a decorr finetune report (or one of an older decorr); run the \
                 fine-tuning again",
                path.display()
            )
        })
    }
}

/// Writes OUT as the run goes.
struct OutWriter<'a> {
    out: &'a Path,
    source: String,
    config: &'a TrainConfig,
    enc_config: &'a ClipTextConfig,
    prompts: Vec<PromptReport>,
    states: Vec<PromptState>,
    epochs: Vec<EpochMetrics>,
    steps: Vec<f64>,
    selected: Option<usize>,
    progress: &'a mut dyn Progress,
}

impl OutWriter<'_> {
    fn write_report(&self, finished: bool) -> Result<(), MethodError> {
        let report = FinetuneReport {
            model: self.source.clone(),
            config: self.config.clone(),
            prompts: self.prompts.clone(),
            epochs: self.epochs.clone(),
            selected_epoch: self.selected,
            step_losses: self.steps.clone(),
            finished,
        };
        let json = serde_json::to_string_pretty(&report).expect("report serializes");
        write_atomic(&self.out.join(FinetuneReport::FILE), json.as_bytes())
            .map_err(|e| MethodError::Output(e.to_string()))?;
        let series = [
            Series {
                name: "L_train (Eq. 2)",
                y_label: "L_train",
                values: self.epochs.iter().map(|m| m.l_train).collect(),
            },
            Series {
                name: "L_corr (Eq. 3)",
                y_label: "L_corr",
                values: self.epochs.iter().map(|m| m.l_corr).collect(),
            },
            Series {
                name: "L_align (Eq. 4)",
                y_label: "L_align",
                values: self.epochs.iter().map(|m| m.l_align).collect(),
            },
            Series {
                name: "L_val (Eq. 5)",
                y_label: "L_val",
                values: self.epochs.iter().map(|m| m.l_val).collect(),
            },
        ];
        let title = match self.selected {
            Some(e) => format!("decorrelation fine-tuning; selected epoch {e} (red)"),
            None => "decorrelation fine-tuning".to_string(),
        };
        panels(&title, "epoch", &series, self.selected)
            .and_then(|chart| chart.write(self.out, "losses"))
            .map_err(|e| MethodError::Output(e.to_string()))
    }
}

impl TrainObserver for OutWriter<'_> {
    fn on_step(&mut self, _step: usize, loss: f64) {
        self.steps.push(loss);
        self.progress.advance(1);
        self.progress.message(&format!("L_train {loss:.5}"));
    }

    fn on_epoch(
        &mut self,
        m: &EpochMetrics,
        maps: &[Vec<Vec<f32>>],
        best: Option<&ClipTextModel>,
    ) -> Result<(), MethodError> {
        self.epochs.push(*m);
        let mark = if best.is_some() { "  <- selected" } else { "" };
        let line = format!(
            "epoch {:>3}: L_train {:.5}  L_corr {:+.5}  L_align {:.5}  L_val {:+.5}{mark}",
            m.epoch, m.l_train, m.l_corr, m.l_align, m.l_val
        );
        self.progress.line(&line);
        if let Some(model) = best {
            // Model first, then the report that names it: a stop in between leaves an older
            // report describing an older epoch, never a report ahead of its weights.
            save_text_encoder(model, self.enc_config, &self.out.join("text_encoder"))?;
            self.selected = Some(m.epoch);
            for ((p, st), map) in self.prompts.iter_mut().zip(&self.states).zip(maps) {
                p.row_after = Some(map[st.focus.target].clone());
            }
        }
        self.write_report(false)
    }

    fn should_stop(&self) -> bool {
        self.progress.should_stop()
    }
}

fn token_ref(tok: &Tokenized, index: usize) -> TokenRef {
    TokenRef {
        index,
        text: tok.token_text(index),
    }
}

/// Fine-tunes into `job.out` (see the module's documentation for what OUT holds when). On
/// SDXL, each fine-tuned encoder is one such folder: `OUT/encoder-1/`, `OUT/encoder-2/`.
pub fn run(job: FinetuneJob, progress: &mut dyn Progress) -> Result<FinetuneOutcome> {
    if is_xl(job.source)? {
        return run_xl(job, progress);
    }
    if job.settings.layer_2.is_some() || job.settings.encoder.is_some() {
        bail!(
            "--layer-2 and --encoder choose among SDXL's two text encoders; {} has one",
            job.source.describe()
        );
    }
    run_one(job, progress)
}

/// The encoders of SDXL whose target rows (at their layers) lean on an earlier token:
/// `A[t,c] > A[t,t]` for some prompt; where neither does, the one whose ratio is larger.
pub fn xl_encoders_to_tune(ratios: [f32; 2]) -> Vec<usize> {
    let leaning: Vec<usize> = (1..=2).filter(|&n| ratios[n - 1] > 1.0).collect();
    if !leaning.is_empty() {
        return leaning;
    }
    vec![if ratios[1] > ratios[0] { 2 } else { 1 }]
}

/// SDXL: the pre-trained tokenizer and encoder `n` (1 or 2), from the caller or loaded.
fn xl_pretrained(job: &FinetuneJob, n: usize) -> Result<Pretrained> {
    let given = if n == 1 {
        &job.pretrained
    } else {
        &job.pretrained_2
    };
    if let Some(p) = given {
        return Ok(p.clone());
    }
    let (enc, tok) = if n == 1 {
        ("text_encoder", "tokenizer")
    } else {
        ("text_encoder_2", "tokenizer_2")
    };
    let encoder = decorr_clip::load_text_encoder_component(job.source, enc, job.device)
        .with_context(|| format!("loading {enc} of {}", job.source.describe()))?;
    Ok(Pretrained {
        tokenizer: decorr_clip::load_tokenizer_component(job.source, tok)?,
        encoder: encoder.model,
        config: encoder.config,
    })
}

/// SDXL: fine-tunes the chosen encoders, each into `OUT/encoder-N/` as [`run_one`] does.
fn run_xl(job: FinetuneJob, progress: &mut dyn Progress) -> Result<FinetuneOutcome> {
    let layers = xl_layers(&job.settings, job.source)?;
    let pretrained = [xl_pretrained(&job, 1)?, xl_pretrained(&job, 2)?];
    let encoders = match job.settings.encoder {
        Some(choice) => choice.encoders(),
        None => {
            // The largest A[t,c]/A[t,t] over the prompts, per encoder.
            let mut ratios = [0f32; 2];
            for n in 0..2 {
                let p = &pretrained[n];
                for (prompt, target) in job.prompts.iter().zip(&job.targets) {
                    let tokenized = p.tokenizer.encode(prompt)?;
                    let t = resolve_target(&tokenized, target)
                        .with_context(|| format!("--target {target} (of the prompt {prompt:?})"))?;
                    let states = prepare(
                        &p.encoder,
                        &[TrainPrompt {
                            tokenized,
                            target: t,
                        }],
                        layers[n],
                        job.device,
                    )
                    .with_context(|| {
                        format!("--layer{} {}", if n == 0 { "" } else { "-2" }, layers[n])
                    })?;
                    let f = &states[0].focus;
                    let row = &states[0].a_pre[f.target];
                    ratios[n] = ratios[n].max(row[f.corr] / row[f.target]);
                }
            }
            let chosen = xl_encoders_to_tune(ratios);
            progress.note(&format!(
                "A[t,c]/A[t,t]: text_encoder {:.3}, text_encoder_2 {:.3}; fine-tuning {}",
                ratios[0],
                ratios[1],
                chosen
                    .iter()
                    .map(|n| if *n == 1 {
                        "text_encoder"
                    } else {
                        "text_encoder_2"
                    })
                    .collect::<Vec<_>>()
                    .join(" and ")
            ));
            chosen
        }
    };
    if let Some(names) = crate::output::contents(&job.out)?
        && let Some(foreign) = names
            .iter()
            .find(|n| !n.starts_with("encoder-") && !decorr_core::io::is_scratch(n))
    {
        bail!(
            "{} holds {foreign}, which decorr finetune does not write for an SDXL checkpoint \
             (it writes encoder-1/ and encoder-2/); choose another --out",
            job.out.display()
        );
    }
    std::fs::create_dir_all(&job.out).with_context(|| format!("creating {}", job.out.display()))?;
    let mut outcomes = Vec::new();
    for n in encoders {
        progress.note(&format!(
            "fine-tuning {} (layer {})",
            if n == 1 {
                "text_encoder"
            } else {
                "text_encoder_2"
            },
            layers[n - 1]
        ));
        let one = FinetuneJob {
            source: job.source,
            device: job.device,
            pretrained: Some(pretrained[n - 1].clone()),
            pretrained_2: None,
            prompts: job.prompts.clone(),
            targets: job.targets.clone(),
            settings: FinetuneSettings {
                layer: layers[n - 1],
                layer_2: None,
                encoder: None,
                ..job.settings.clone()
            },
            out: job.out.join(format!("encoder-{n}")),
            overwrite: job.overwrite,
        };
        let outcome = run_one(one, progress)?;
        let stop = !matches!(
            outcome,
            FinetuneOutcome::Done {
                interrupted: false,
                ..
            }
        );
        outcomes.push((n, outcome));
        if stop {
            break;
        }
    }
    Ok(FinetuneOutcome::Encoders(outcomes))
}

/// SDXL: the finished fine-tunings of `out` (`encoder-1/`, `encoder-2/`), when there is at
/// least one and each there is finished.
pub fn finished_xl(out: &Path) -> Option<Vec<(usize, FinetuneReport)>> {
    let mut done = Vec::new();
    for n in 1..=2 {
        let dir = out.join(format!("encoder-{n}"));
        if dir.exists() {
            done.push((n, finished(&dir)?));
        }
    }
    (!done.is_empty()).then_some(done)
}

/// The one fine-tuning of an SD 1.x/2.x encoder (or of one SDXL encoder) into `job.out`.
fn run_one(job: FinetuneJob, progress: &mut dyn Progress) -> Result<FinetuneOutcome> {
    if job.prompts.len() != job.targets.len() {
        bail!(
            "{} --prompt but {} --target: give one --target per --prompt, in the same order",
            job.prompts.len(),
            job.targets.len()
        );
    }
    let st = &job.settings;
    // The argument parser already refused these; callers that build the settings themselves
    // are checked again before anything touches OUT.
    if st.epochs == 0 || st.steps_per_epoch == 0 {
        bail!("--epochs and --steps-per-epoch must be at least 1");
    }
    if !(st.lr.is_finite() && st.lr > 0.0) {
        bail!("--lr {}: must be a finite number > 0", st.lr);
    }
    if !(st.tau.is_finite() && st.tau >= 0.0) {
        bail!("--tau {}: must be a finite number >= 0", st.tau);
    }
    if !(st.weight_decay.is_finite() && st.weight_decay >= 0.0) {
        bail!(
            "--weight-decay {}: must be a finite number >= 0",
            st.weight_decay
        );
    }
    // Everything about OUT is decided before the model is loaded: a refusal costs nothing.
    let replacing = holds_results(&job.out)?;
    if replacing && !job.overwrite {
        bail!(
            "{} already exists; choose another --out or pass --overwrite to replace it",
            job.out.display()
        );
    }
    if replacing {
        check_finetune_folder(&job.out)?;
    }
    let _lock = OutputLock::acquire(&job.out)?;
    // A replaced OUT is built beside the old one and swapped in only when the run succeeds, so
    // a failed or interrupted run leaves the previous encoder as it was.
    let staging = if replacing {
        if let Some(parent) = job.out.parent() {
            remove_stale_temps(parent, 0);
        }
        Some(
            temp_dir_beside(&job.out)
                .with_context(|| format!("creating a folder beside {}", job.out.display()))?,
        )
    } else {
        None
    };
    let work = staging
        .as_ref()
        .map_or_else(|| job.out.clone(), |t| t.path().to_path_buf());
    let mut selected = None;
    let result = train(&job, &work, &mut selected, progress);
    let out = job.out.display();
    let done = |t: Trained, selected: usize| FinetuneOutcome::Done {
        selected,
        interrupted: t.interrupted,
        ratios: t.ratios,
    };
    match (staging, result, selected) {
        (None, Ok(trained), Some(sel)) => Ok(done(trained, sel)),
        (None, Err(e), Some(sel)) => Err(e).context(format!("{out} keeps epoch {sel}")),
        // Nothing selected in a fresh OUT: remove it, so that a re-run is not refused.
        (None, result, None) => {
            let _ = std::fs::remove_dir_all(&job.out);
            match result {
                Ok(_) => Ok(FinetuneOutcome::NothingSelected),
                Err(e) => Err(e).context(format!("no epoch was completed; {out} was not written")),
            }
        }
        (Some(_), Err(e), Some(ep)) => Err(e).context(format!(
            "the run stopped at epoch {ep} and was discarded; the previous {out} is unchanged"
        )),
        (Some(_), Err(e), None) => Err(e).context(format!("the previous {out} is unchanged")),
        (Some(_), Ok(trained), sel) if trained.interrupted || sel.is_none() => {
            Ok(FinetuneOutcome::Discarded)
        }
        (Some(staging), Ok(trained), sel) => {
            swap_in(staging, &job.out)?;
            Ok(done(trained, sel.unwrap_or_default()))
        }
    }
}

/// What [`train`] leaves for the outcome.
struct Trained {
    interrupted: bool,
    /// Per prompt: (prompt, A[t,c]/A[t,t] before, after).
    ratios: Vec<(String, f32, f32)>,
}

/// Whether `out` holds anything but what a lock leaves (an empty folder left by a run that
/// completed no epoch is no result to protect).
fn holds_results(out: &Path) -> Result<bool> {
    Ok(crate::output::contents(out)?.is_some_and(|names| !names.is_empty()))
}

/// `--overwrite` replaces only what `decorr finetune` writes: a folder holding anything else
/// was not made by it, and is refused with the first foreign file named.
fn check_finetune_folder(out: &Path) -> Result<()> {
    let ours = |rel: &str| {
        matches!(
            rel,
            "text_encoder"
                | "text_encoder/config.json"
                | "text_encoder/model.safetensors"
                | "report.json"
                | "losses.png"
                | "losses.svg"
        ) || rel.rsplit('/').next().is_some_and(|name| {
            decorr_core::io::is_scratch(name)
                || (rel.starts_with("text_encoder/") && decorr_core::io::is_burn_scratch(name))
        })
    };
    for dir in [out.to_path_buf(), out.join("text_encoder")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let rel = e.path();
            let rel = rel
                .strip_prefix(out)
                .unwrap_or(&rel)
                .to_string_lossy()
                .replace('\\', "/");
            if !ours(&rel) {
                bail!(
                    "--overwrite refuses {}: it holds {rel}, which decorr finetune does not \
                     write, so it is not a decorr finetune output; move it away or choose \
                     another --out",
                    out.display()
                );
            }
        }
    }
    if !out.join("report.json").is_file() {
        bail!(
            "--overwrite refuses {}: it has no report.json, so it is not a decorr finetune \
             output; choose another --out",
            out.display()
        );
    }
    Ok(())
}

/// Replaces `out` by the finished `staging` folder: the old one is renamed aside first, so at
/// every moment `out` is either the old result or the new one.
fn swap_in(staging: tempfile::TempDir, out: &Path) -> Result<()> {
    let old = temp_dir_beside(out)
        .with_context(|| format!("creating a folder beside {}", out.display()))?;
    let aside = old.path().join("old");
    std::fs::rename(out, &aside)
        .with_context(|| format!("moving the previous {} aside", out.display()))?;
    if let Err(e) = std::fs::rename(staging.path(), out) {
        let _ = std::fs::rename(&aside, out);
        return Err(e).with_context(|| format!("moving the new result into {}", out.display()));
    }
    let _ = staging.keep();
    drop(old); // removes the previous result
    // The staging folder was created private; the result gets the umask's permissions.
    decorr_core::io::make_readable(out)?;
    Ok(())
}

/// Loads the encoder and fine-tunes into `work`; `selected_out` is the epoch selected so far
/// (also when the run failed: what `work` then holds).
fn train(
    job: &FinetuneJob,
    work: &Path,
    selected_out: &mut Option<usize>,
    progress: &mut dyn Progress,
) -> Result<Trained> {
    let source = job.source;
    let device = job.device;
    let pretrained = match &job.pretrained {
        Some(p) => p.clone(),
        None => {
            let encoder = decorr_clip::load_text_encoder(source, device)
                .with_context(|| format!("loading the text encoder of {}", source.describe()))?;
            Pretrained {
                tokenizer: decorr_clip::load_tokenizer(source)?,
                encoder: encoder.model,
                config: encoder.config,
            }
        }
    };
    let tokenizer = &pretrained.tokenizer;
    let mut prompts = Vec::new();
    for (p, t) in job.prompts.iter().zip(&job.targets) {
        let tokenized = tokenizer.encode(p)?;
        let target = resolve_target(&tokenized, t)
            .with_context(|| format!("--target {t} (of the prompt {p:?})"))?;
        prompts.push(TrainPrompt { tokenized, target });
    }
    let st = &job.settings;
    let config = TrainConfig {
        layer: st.layer,
        epochs: st.epochs,
        steps_per_epoch: st.steps_per_epoch,
        lr: st.lr,
        weight_decay: st.weight_decay,
        tau: st.tau,
        params: st.params,
        seed: st.seed,
        ..Default::default()
    };
    let states = prepare(&pretrained.encoder, &prompts, config.layer, device)?;
    let total = (config.epochs * config.steps_per_epoch) as u64;
    let prompt_reports = prompts
        .iter()
        .zip(&states)
        .map(|(p, st)| PromptReport {
            prompt: p.tokenized.prompt.clone(),
            tokens: (0..st.focus.n_real)
                .map(|i| p.tokenized.token_text(i))
                .collect(),
            target: token_ref(&p.tokenized, st.focus.target),
            corr: token_ref(&p.tokenized, st.focus.corr),
            s: st.focus.s().map(|i| token_ref(&p.tokenized, i)).collect(),
            row_before: st.a_pre[st.focus.target].clone(),
            row_after: None,
        })
        .collect();
    for (p, st) in prompts.iter().zip(&states) {
        progress.line(&format!(
            "{:?}: target {:?} ({}), corr {:?} ({}), A_pre[t,c] {:.4} vs A_pre[t,t] {:.4}",
            p.tokenized.prompt,
            p.tokenized.token_text(st.focus.target),
            st.focus.target,
            p.tokenized.token_text(st.focus.corr),
            st.focus.corr,
            st.a_pre[st.focus.target][st.focus.corr],
            st.a_pre[st.focus.target][st.focus.target],
        ));
    }
    progress.begin("fine-tuning", total, "steps");
    let mut writer = OutWriter {
        out: work,
        source: source.describe(),
        config: &config,
        enc_config: &pretrained.config,
        prompts: prompt_reports,
        states,
        epochs: Vec::new(),
        steps: Vec::new(),
        selected: None,
        progress,
    };
    let states = writer.states.clone();
    let result = finetune_prepared(
        pretrained.encoder,
        &prompts,
        states,
        &config,
        device,
        &mut writer,
    );
    writer.progress.end();
    *selected_out = writer.selected;
    let outcome = result?;
    writer.write_report(!outcome.interrupted)?;
    let ratios = writer
        .prompts
        .iter()
        .zip(&writer.states)
        .filter_map(|(p, st)| {
            let after = p.row_after.as_ref()?;
            let (t, c) = (st.focus.target, st.focus.corr);
            Some((
                p.prompt.clone(),
                p.row_before[c] / p.row_before[t],
                after[c] / after[t],
            ))
        })
        .collect();
    Ok(Trained {
        interrupted: outcome.interrupted,
        ratios,
    })
}
