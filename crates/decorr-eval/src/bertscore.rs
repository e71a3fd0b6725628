//! BERTScore (Zhang et al. 2020) with the `bert_score` package's (0.3.13) exact recipe:
//! `sent_encode` tokenization (specials added, truncated to the tokenizer's `model_max_length`),
//! idf weights over the references (`ln((M+1)/(df+1))`) or uniform weights with `[CLS]`/`[SEP]` at
//! 0, one chosen hidden state per token, L2-normalised, greedy cosine matching weighted by idf,
//! P/R/F per pair with bert_score's handling of empty sentences, and the optional baseline
//! rescale `(x - b) / (1 - b)` from a bert_score baseline file.
//!
//! The model side is any [`LayerEncoder`] (BERT in [`crate::bert`], DeBERTa in
//! [`crate::deberta`]); the tokenizer side is any [`SentenceEncoder`], by default a
//! `tokenizer.json` whose post-processor adds the specials ([`HfSentenceEncoder`]). Those
//! traits live in [`crate::encoder`]; this module builds scorers from model folders
//! ([`load_scorer`], [`load_bert_scorer`], [`load_deberta_scorer`]).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use tokenizers::Tokenizer;

use crate::EvalError;
use crate::bert::load_bert;
use crate::deberta::{XLARGE_MNLI_LAYER, load_deberta, load_deberta_tokenizer, special_token_name};

// The encoder side lives in `crate::encoder` so that the models can implement it without
// depending on the scorer; re-exported here, where BERTScore's users have always found it.
pub use crate::encoder::{HfSentenceEncoder, LayerEncoder, SentenceEncoder, SpecialTokens};

/// A tokenizer folder as transformers saves it.
pub struct TokenizerFiles {
    pub tokenizer: Tokenizer,
    pub specials: SpecialTokens,
    /// `model_max_length` of `tokenizer_config.json`, or the fallback when it is absent or
    /// transformers' "no limit" value.
    pub max_length: usize,
}

/// Read `tokenizer.json`, and `tokenizer_config.json` / `special_tokens_map.json` when present
/// for `model_max_length` and the `cls`/`sep`/`pad` tokens (BERT's `[CLS]`, `[SEP]`, `[PAD]` by
/// default). `fallback_max_length` (the model's position count) caps the length.
pub fn load_tokenizer_dir(
    dir: &Path,
    fallback_max_length: usize,
) -> Result<TokenizerFiles, EvalError> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(EvalError::Input(format!(
            "{} has no tokenizer.json; save the tokenizer with a fast (tokenizers) backend",
            dir.display()
        )));
    }
    let text = decorr_core::input::read_text(&path, "a tokenizer file")?;
    let tokenizer = text.parse::<Tokenizer>().map_err(|e| EvalError::BadFile {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let mut settings = serde_json::Map::new();
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let p = dir.join(name);
        if p.is_file() {
            let v: serde_json::Value = decorr_core::weights::read_json(&p, "a tokenizer config")?;
            if let serde_json::Value::Object(m) = v {
                settings.extend(m);
            }
        }
    }
    let token = |key: &str, default: &str| -> Result<u32, EvalError> {
        let name = match settings.get(key) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Object(o)) => match o.get("content") {
                Some(serde_json::Value::String(s)) => s.clone(),
                _ => default.to_string(),
            },
            _ => default.to_string(),
        };
        tokenizer
            .token_to_id(&name)
            .ok_or_else(|| EvalError::BadFile {
                path: path.clone(),
                message: format!("{key} {name:?} is not in the vocabulary"),
            })
    };
    let specials = SpecialTokens {
        cls: token("cls_token", "[CLS]")?,
        sep: token("sep_token", "[SEP]")?,
        pad: token("pad_token", "[PAD]")?,
    };
    // transformers writes VERY_LARGE_INTEGER (1e30) for "no limit".
    let max_length = match settings.get("model_max_length").and_then(|v| v.as_f64()) {
        Some(m) if (1.0..1e18).contains(&m) => (m as usize).min(fallback_max_length),
        _ => fallback_max_length,
    };
    Ok(TokenizerFiles {
        tokenizer,
        specials,
        max_length,
    })
}

/// Baseline values of one layer (a row of bert_score's `rescale_baseline/<lang>/<model>.tsv`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Baseline {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

impl Baseline {
    /// Row `layer` (0-based data row, as bert_score's `pd.read_csv(path).iloc[num_layers]`) of a
    /// comma-separated file with a `LAYER,P,R,F` header.
    pub fn read(path: &Path, layer: usize) -> Result<Baseline, EvalError> {
        let text = decorr_core::input::read_text(path, "a BERTScore baseline file (CSV)")?;
        Self::parse(&text, layer).map_err(|message| EvalError::BadFile {
            path: path.to_path_buf(),
            message,
        })
    }

    fn parse(text: &str, layer: usize) -> Result<Baseline, String> {
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let header: Vec<&str> = lines
            .next()
            .ok_or("empty baseline file")?
            .split(',')
            .map(str::trim)
            .collect();
        let col = |name: &str| {
            header.iter().position(|h| *h == name).ok_or(format!(
                "no {name} column in the header {header:?} (expected LAYER,P,R,F)"
            ))
        };
        let (p, r, f) = (col("P")?, col("R")?, col("F")?);
        let rows: Vec<&str> = lines.collect();
        let row = rows.get(layer).ok_or(format!(
            "it has {} data rows; layer {layer} needs row {layer}",
            rows.len()
        ))?;
        let cells: Vec<&str> = row.split(',').map(str::trim).collect();
        let num = |i: usize| -> Result<f64, String> {
            let cell = cells
                .get(i)
                .ok_or(format!("row {layer} has too few columns"))?;
            cell.parse()
                .map_err(|_| format!("row {layer}: {cell:?} is not a number"))
        };
        Ok(Baseline {
            precision: num(p)?,
            recall: num(r)?,
            f1: num(f)?,
        })
    }

    fn rescale(x: f64, b: f64) -> f64 {
        (x - b) / (1.0 - b)
    }
}

/// How [`Scorer::score`] runs.
#[derive(Debug, Clone)]
pub struct ScoreOptions {
    /// Weight tokens by idf computed over the references (`idf=True`).
    pub idf: bool,
    /// Rescale P/R/F with this baseline (`rescale_with_baseline=True`).
    pub baseline: Option<Baseline>,
    /// Sentences per forward pass and pairs per matching batch (bert_score's `batch_size`).
    pub batch_size: usize,
}

impl Default for ScoreOptions {
    /// bert_score's defaults: no idf, no rescaling, batch size 64.
    fn default() -> Self {
        ScoreOptions {
            idf: false,
            baseline: None,
            batch_size: 64,
        }
    }
}

/// BERTScore of one candidate/reference pair. Pairs whose candidate or reference is empty
/// score 0 (bert_score's warning case); a sentence whose idf weights sum to 0 gives NaN
/// precision and recall and F1 0, as bert_score returns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairScore {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// One tokenized sentence: L2-normalised embeddings `[len][hidden]` and its idf weights.
#[derive(Debug, Clone)]
pub struct Embedded {
    pub embeddings: Vec<Vec<f32>>,
    pub idf: Vec<f64>,
}

/// A model, its tokenizer and the layer BERTScore reads.
pub struct Scorer {
    encoder: Box<dyn LayerEncoder>,
    tokenizer: Box<dyn SentenceEncoder>,
    specials: SpecialTokens,
    layer: usize,
    device: Device,
}

impl Scorer {
    /// `layer` is bert_score's `num_layers`: 0 = embeddings, `encoder.num_layers()` = last.
    pub fn new(
        encoder: Box<dyn LayerEncoder>,
        tokenizer: Box<dyn SentenceEncoder>,
        specials: SpecialTokens,
        layer: usize,
        device: Device,
    ) -> Result<Self, EvalError> {
        let n = encoder.num_layers();
        if layer > n {
            return Err(EvalError::Input(format!(
                "layer {layer} is out of range: the model has {n} layers (choose 0..={n})"
            )));
        }
        Ok(Scorer {
            encoder,
            tokenizer,
            specials,
            layer,
            device,
        })
    }

    pub fn layer(&self) -> usize {
        self.layer
    }

    /// `sent_encode` of one sentence.
    pub fn encode(&self, sentence: &str) -> Result<Vec<u32>, EvalError> {
        self.tokenizer.encode(sentence)
    }

    /// P/R/F of each `candidates[i]` against `references[i]`.
    pub fn score(
        &self,
        candidates: &[String],
        references: &[String],
        opts: &ScoreOptions,
    ) -> Result<Vec<PairScore>, EvalError> {
        if candidates.is_empty() {
            return Err(EvalError::Input(
                "no sentences to score: give at least one candidate/reference pair".into(),
            ));
        }
        if candidates.len() != references.len() {
            return Err(EvalError::Input(format!(
                "{} candidates but {} references: BERTScore needs one reference per candidate",
                candidates.len(),
                references.len()
            )));
        }
        if opts.batch_size == 0 {
            return Err(EvalError::Input("batch size must be at least 1".into()));
        }

        // Each distinct sentence is tokenized and embedded once.
        let mut ids: HashMap<&str, Vec<u32>> = HashMap::new();
        for s in candidates.iter().chain(references) {
            if !ids.contains_key(s.as_str()) {
                ids.insert(s, self.tokenizer.encode(s)?);
            }
        }
        let weights = if opts.idf {
            let refs: Vec<&[u32]> = references
                .iter()
                .map(|r| ids[r.as_str()].as_slice())
                .collect();
            Weights::Idf(idf_dict(&refs))
        } else {
            Weights::Uniform(self.specials)
        };
        let embedded = self.embed_all(&ids, &weights, opts.batch_size)?;

        let mut out = Vec::with_capacity(candidates.len());
        for (cands, refs) in candidates
            .chunks(opts.batch_size)
            .zip(references.chunks(opts.batch_size))
        {
            // bert_score pads each matching batch to its longest sentence; the padded
            // similarities are 0 and take part in the max (see `greedy_cos_idf`).
            let hyp_pad = cands.iter().map(|c| embedded[c.as_str()].idf.len()).max();
            let ref_pad = refs.iter().map(|r| embedded[r.as_str()].idf.len()).max();
            for (c, r) in cands.iter().zip(refs) {
                let mut s = greedy_cos_idf(
                    &embedded[c.as_str()],
                    &embedded[r.as_str()],
                    hyp_pad.unwrap_or(0),
                    ref_pad.unwrap_or(0),
                );
                if let Some(b) = &opts.baseline {
                    s = PairScore {
                        precision: Baseline::rescale(s.precision, b.precision),
                        recall: Baseline::rescale(s.recall, b.recall),
                        f1: Baseline::rescale(s.f1, b.f1),
                    };
                }
                out.push(s);
            }
        }
        Ok(out)
    }

    /// Normalised embeddings and weights of every sentence, in forward batches of `batch_size`
    /// sentences of similar length.
    fn embed_all<'a>(
        &self,
        ids: &HashMap<&'a str, Vec<u32>>,
        weights: &Weights,
        batch_size: usize,
    ) -> Result<HashMap<&'a str, Embedded>, EvalError> {
        let mut order: Vec<(&'a str, &Vec<u32>)> = ids.iter().map(|(s, i)| (*s, i)).collect();
        order.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(b.0)));
        let mut out = HashMap::with_capacity(order.len());
        for batch in order.chunks(batch_size) {
            let b = batch.len();
            let n = batch.iter().map(|(_, i)| i.len()).max().unwrap_or(0);
            let mut flat_ids = vec![self.specials.pad as i64; b * n];
            let mut mask = vec![0i64; b * n];
            for (row, (_, t)) in batch.iter().enumerate() {
                for (col, &id) in t.iter().enumerate() {
                    flat_ids[row * n + col] = id as i64;
                    mask[row * n + col] = 1;
                }
            }
            let input =
                Tensor::<2, Int>::from_data(TensorData::new(flat_ids, [b, n]), &self.device);
            let mask = Tensor::<2, Int>::from_data(TensorData::new(mask, [b, n]), &self.device);
            let hidden = self.encoder.hidden_state(input, mask, self.layer);
            let [_, _, d] = hidden.dims();
            let values = hidden
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|e| EvalError::Input(format!("cannot read hidden states: {e:?}")))?;
            for (row, (s, t)) in batch.iter().enumerate() {
                let embeddings = (0..t.len())
                    .map(|col| {
                        let start = (row * n + col) * d;
                        normalize(&values[start..start + d])
                    })
                    .collect();
                let idf = t.iter().map(|&id| weights.get(id)).collect();
                out.insert(*s, Embedded { embeddings, idf });
            }
        }
        Ok(out)
    }
}

/// A BERTScore scorer for the BERT in `dir` (`config.json`, weights, `tokenizer.json`, and
/// `tokenizer_config.json` for `model_max_length`). `layer` is bert_score's `num_layers`; `None`
/// takes the last layer (bert_score's per-model defaults are keyed by hub names, which a local
/// folder does not have).
pub fn load_bert_scorer(
    dir: &Path,
    layer: Option<usize>,
    device: &Device,
) -> Result<Scorer, EvalError> {
    let bert = load_bert(dir, device)?;
    let files = load_tokenizer_dir(dir, bert.model.max_positions())?;
    let vocab = files.tokenizer.get_vocab_size(true);
    if vocab > bert.model.vocab_size() {
        return Err(EvalError::Input(format!(
            "{}: the tokenizer has {vocab} tokens but the model only {} embeddings; \
             tokenizer.json belongs to another model",
            dir.display(),
            bert.model.vocab_size()
        )));
    }
    let layer = layer.unwrap_or(bert.model.num_layers());
    let tokenizer = HfSentenceEncoder::new(files.tokenizer, files.max_length)?;
    Scorer::new(
        Box::new(bert.model),
        Box::new(tokenizer),
        files.specials,
        layer,
        device.clone(),
    )
}

/// A BERTScore scorer for the DeBERTa in `dir` ([`load_deberta`], [`load_deberta_tokenizer`]).
/// `layer` is bert_score's `num_layers` (pass [`XLARGE_MNLI_LAYER`] for
/// microsoft/deberta-xlarge-mnli); `None` takes the last layer, since a local folder has no hub
/// name to look bert_score's default up by. Sentences are truncated to `model_max_length` of
/// `tokenizer_config.json`, else to `max_position_embeddings` (what transformers 4 did for the
/// hub's DeBERTa tokenizers, 512; transformers 5 has no such default and bert_score then fails).
/// `prefix_space`: see [`HfSentenceEncoder::with_prefix_space`].
pub fn load_deberta_scorer(
    dir: &Path,
    layer: Option<usize>,
    prefix_space: bool,
    device: &Device,
) -> Result<Scorer, EvalError> {
    let (model, config) = load_deberta(dir, device)?;
    let tokenizer = load_deberta_tokenizer(dir)?;
    let vocab = tokenizer.get_vocab_size(true);
    if vocab > model.vocab_size() {
        return Err(EvalError::Input(format!(
            "{}: the tokenizer has {vocab} tokens but the model only {} embeddings; the \
             tokenizer files belong to another model",
            dir.display(),
            model.vocab_size()
        )));
    }
    let id = |key: &str, default: &str| -> Result<u32, EvalError> {
        let name = special_token_name(dir, key, default)?;
        tokenizer.token_to_id(&name).ok_or_else(|| {
            EvalError::Tokenizer(format!(
                "{}: {key} `{name}` is not in the vocabulary",
                dir.display()
            ))
        })
    };
    let specials = SpecialTokens {
        cls: id("cls_token", "[CLS]")?,
        sep: id("sep_token", "[SEP]")?,
        pad: id("pad_token", "[PAD]")?,
    };
    let max_length = tokenizer
        .get_truncation()
        .map(|t| t.max_length)
        .unwrap_or(config.max_position_embeddings);
    let max_length = model.max_len().map_or(max_length, |m| max_length.min(m));
    let layer = layer.unwrap_or(model.num_layers());
    let encoder = HfSentenceEncoder::new(tokenizer, max_length)?.with_prefix_space(prefix_space);
    Scorer::new(
        Box::new(model),
        Box::new(encoder),
        specials,
        layer,
        device.clone(),
    )
}

/// Token weights: bert_score's `idf_dict`.
enum Weights {
    /// `defaultdict(lambda: 1.0)` with `[SEP]` and `[CLS]` at 0.
    Uniform(SpecialTokens),
    /// `get_idf_dict` over the references; unseen tokens get `ln(M+1)` (the `default`).
    Idf(IdfDict),
}

impl Weights {
    fn get(&self, id: u32) -> f64 {
        // bert_score stores weights in a float32 tensor.
        let w = match self {
            Weights::Uniform(s) if id == s.cls || id == s.sep => 0.0,
            Weights::Uniform(_) => 1.0,
            Weights::Idf(d) => d.weights.get(&id).copied().unwrap_or(d.default),
        };
        w as f32 as f64
    }
}

/// Inverse document frequencies of token ids over a set of documents.
#[derive(Debug, Clone, PartialEq)]
pub struct IdfDict {
    pub weights: HashMap<u32, f64>,
    /// Weight of a token that occurs in no document: `ln(M+1)`.
    pub default: f64,
}

/// bert_score's `get_idf_dict`: `ln((M+1)/(df+1))` with `df` the number of the `M` documents
/// (token id lists, specials included) that contain the id. Specials present in every
/// document get 0.
pub fn idf_dict(documents: &[&[u32]]) -> IdfDict {
    let m = documents.len() as f64;
    let mut df: HashMap<u32, usize> = HashMap::new();
    for doc in documents {
        for id in doc.iter().copied().collect::<HashSet<u32>>() {
            *df.entry(id).or_default() += 1;
        }
    }
    IdfDict {
        weights: df
            .into_iter()
            .map(|(id, c)| (id, ((m + 1.0) / (c as f64 + 1.0)).ln()))
            .collect(),
        default: (m + 1.0).ln(),
    }
}

fn normalize(v: &[f32]) -> Vec<f32> {
    let norm = v
        .iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt();
    v.iter().map(|&x| (x as f64 / norm) as f32).collect()
}

/// bert_score's `greedy_cos_idf` for one pair. `hyp_pad`/`ref_pad` are the longest candidate and
/// reference of the matching batch: when a sentence is shorter than its batch's longest, the
/// padded positions contribute similarity 0 to the other side's maxima (bert_score multiplies
/// the similarity matrix by the mask before taking the max), which matters only when every real
/// similarity is negative.
pub fn greedy_cos_idf(
    hyp: &Embedded,
    refr: &Embedded,
    hyp_pad: usize,
    ref_pad: usize,
) -> PairScore {
    let (nh, nr) = (hyp.embeddings.len(), refr.embeddings.len());
    let sim: Vec<Vec<f64>> = hyp
        .embeddings
        .iter()
        .map(|h| {
            refr.embeddings
                .iter()
                .map(|r| h.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum())
                .collect()
        })
        .collect();
    let floor = |padded: bool| if padded { 0.0 } else { f64::NEG_INFINITY };
    let word_precision = sim
        .iter()
        .map(|row| row.iter().copied().fold(floor(nr < ref_pad), f64::max));
    let word_recall = (0..nr).map(|j| {
        sim.iter()
            .map(|row| row[j])
            .fold(floor(nh < hyp_pad), f64::max)
    });
    let weighted = |words: &mut dyn Iterator<Item = f64>, idf: &[f64]| {
        let total: f64 = idf.iter().sum();
        words.zip(idf).map(|(w, i)| w * (i / total)).sum::<f64>()
    };
    let mut p = weighted(&mut { word_precision }, &hyp.idf);
    let mut r = weighted(&mut { word_recall }, &refr.idf);
    let mut f = 2.0 * p * r / (p + r);
    // A sentence of the two specials only (empty text): P and R are set to 0.
    if nh == 2 || nr == 2 {
        p = 0.0;
        r = 0.0;
    }
    if f.is_nan() {
        f = 0.0;
    }
    PairScore {
        precision: p,
        recall: r,
        f1: f,
    }
}

/// A scorer for the model in `dir`, chosen by `config.json`'s `model_type`: the BERT family
/// ([`load_bert_scorer`]) or DeBERTa v1 ([`load_deberta_scorer`]). Without a
/// `layer`, DeBERTa-xlarge (48 layers of width 1024, i.e. `microsoft/deberta-xlarge-mnli`) reads
/// layer 40 as bert_score does for it; other models their last layer.
/// `prefix_space` encodes DeBERTa sentences with a leading space, as bert_score did under
/// transformers < 4.24 ([`HfSentenceEncoder::with_prefix_space`]); BERT's WordPiece has no such
/// variant, so it is refused there.
pub fn load_scorer(
    dir: &Path,
    layer: Option<usize>,
    prefix_space: bool,
    device: &Device,
) -> Result<Scorer, EvalError> {
    #[derive(serde::Deserialize)]
    struct Kind {
        model_type: Option<String>,
        num_hidden_layers: Option<usize>,
        hidden_size: Option<usize>,
    }
    let kind: Kind =
        decorr_core::weights::read_json(&dir.join("config.json"), "a BERTScore model config")?;
    match kind.model_type.as_deref() {
        Some("bert") if prefix_space => Err(EvalError::Input(format!(
            "{}: the leading-space encoding is for DeBERTa's byte-level BPE; a BERT (WordPiece) \
             model has none: drop the prefix-space option",
            dir.display()
        ))),
        Some("bert") => load_bert_scorer(dir, layer, device),
        Some("deberta") => {
            let xlarge = kind.num_hidden_layers == Some(48) && kind.hidden_size == Some(1024);
            let layer = layer.or(xlarge.then_some(XLARGE_MNLI_LAYER));
            load_deberta_scorer(dir, layer, prefix_space, device)
        }
        other => Err(EvalError::Input(format!(
            "{}: model_type {} is not a BERTScore model decorr runs; use a BERT-family model \
             (e.g. a folder with all-MiniLM-L6-v2) or DeBERTa v1 (microsoft/deberta-xlarge-mnli)",
            dir.display(),
            other.map_or("(missing)".to_string(), |t| format!("`{t}`"))
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emb(rows: &[&[f32]], idf: &[f64]) -> Embedded {
        Embedded {
            embeddings: rows.iter().map(|r| normalize(r)).collect(),
            idf: idf.to_vec(),
        }
    }

    #[test]
    fn idf_counts_documents_not_occurrences() {
        let d = idf_dict(&[&[1, 5, 5, 2], &[1, 6, 2], &[1, 5, 2]]);
        assert_eq!(d.weights[&1], 0.0, "a token in every document weighs 0");
        assert!((d.weights[&5] - (4.0f64 / 3.0).ln()).abs() < 1e-15);
        assert!((d.weights[&6] - 2.0f64.ln()).abs() < 1e-15);
        assert!((d.default - 4.0f64.ln()).abs() < 1e-15);
        assert!(!d.weights.contains_key(&7));
    }

    #[test]
    fn greedy_matching_by_hand() {
        // Hypothesis tokens: cls, x, y, sep; reference: cls, x, sep. Orthogonal axes.
        let cls: &[f32] = &[1.0, 0.0, 0.0, 0.0];
        let sep: &[f32] = &[0.0, 0.0, 0.0, 2.0];
        let x: &[f32] = &[0.0, 3.0, 0.0, 0.0];
        let y: &[f32] = &[0.0, 1.0, 1.0, 0.0];
        let hyp = emb(&[cls, x, y, sep], &[0.0, 1.0, 1.0, 0.0]);
        let refr = emb(&[cls, x, sep], &[0.0, 1.0, 0.0]);
        let s = greedy_cos_idf(&hyp, &refr, 4, 3);
        let c = std::f64::consts::FRAC_1_SQRT_2;
        assert!((s.precision - (1.0 + c) / 2.0).abs() < 1e-7, "{s:?}");
        assert!((s.recall - 1.0).abs() < 1e-7, "{s:?}");
        let f = 2.0 * s.precision / (s.precision + 1.0);
        assert!((s.f1 - f).abs() < 1e-12);
        // idf weights change the precision average.
        let hyp_w = Embedded {
            idf: vec![0.0, 3.0, 1.0, 0.0],
            ..hyp.clone()
        };
        let s = greedy_cos_idf(&hyp_w, &refr, 4, 3);
        assert!((s.precision - (3.0 + c) / 4.0).abs() < 1e-7, "{s:?}");
    }

    #[test]
    fn padding_floors_negative_maxima_at_zero() {
        let hyp = emb(&[&[1.0, 0.0], &[-1.0, -0.1], &[0.0, 1.0]], &[0.0, 1.0, 0.0]);
        let refr = emb(&[&[0.0, 1.0], &[1.0, 0.0], &[0.0, 1.0]], &[0.0, 1.0, 0.0]);
        let alone = greedy_cos_idf(&hyp, &refr, 3, 3);
        assert!(
            (alone.precision + 0.1 / 1.01f64.sqrt()).abs() < 1e-6,
            "{alone:?}"
        );
        // The same pair in a batch with a longer reference: the max includes a padded 0.
        let batched = greedy_cos_idf(&hyp, &refr, 3, 5);
        assert_eq!(batched.precision, 0.0);
        assert_eq!(batched.recall, alone.recall);
    }

    #[test]
    fn empty_sentences_score_zero() {
        let hyp = emb(&[&[1.0, 0.0], &[0.0, 1.0]], &[0.0, 0.0]);
        let refr = emb(&[&[1.0, 0.0], &[1.0, 1.0], &[0.0, 1.0]], &[0.0, 1.0, 0.0]);
        let s = greedy_cos_idf(&hyp, &refr, 2, 3);
        assert_eq!((s.precision, s.recall, s.f1), (0.0, 0.0, 0.0));
        let s = greedy_cos_idf(&refr, &hyp, 3, 2);
        assert_eq!((s.precision, s.recall, s.f1), (0.0, 0.0, 0.0));
    }

    #[test]
    fn zero_idf_sum_gives_nan_like_bert_score() {
        let a = emb(&[&[1.0, 0.0], &[1.0, 1.0], &[0.0, 1.0]], &[0.0, 0.0, 0.0]);
        let s = greedy_cos_idf(&a, &a, 3, 3);
        assert!(s.precision.is_nan() && s.recall.is_nan());
        assert_eq!(s.f1, 0.0);
    }

    #[test]
    fn baseline_parsing() {
        let text = "LAYER,P,R,F\n0,0.1,0.2,0.3\n1,0.4,0.5,0.6\n";
        let b = Baseline::parse(text, 1).unwrap();
        assert_eq!((b.precision, b.recall, b.f1), (0.4, 0.5, 0.6));
        let e = Baseline::parse(text, 2).unwrap_err();
        assert!(e.contains("2 data rows"), "{e}");
        let e = Baseline::parse("LAYER,P,R\n0,1,2\n", 0).unwrap_err();
        assert!(e.contains("no F column"), "{e}");
        let e = Baseline::parse("LAYER,P,R,F\n0,a,2,3\n", 0).unwrap_err();
        assert!(e.contains("not a number"), "{e}");
        assert_eq!(Baseline::rescale(0.75, 0.5), 0.5);
    }
}
