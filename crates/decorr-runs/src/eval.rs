//! `decorr eval run`'s orchestration: the images the `decorr generate` folders list, a caption
//! and yes/no answers per image from the VLM (cached, so an interrupted evaluation resumes),
//! BERTScore of caption against prompt, Inception features; then, at the merge (or at once when
//! not sharded), FID per method and the table-3 report (`report.md`, `report.csv`,
//! `report.json`, and the bars as `report.svg` and `report.png`). `shard: Some(K/N)` does one
//! share of the images (partial results under `OUT/partial/`); `merge` joins them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use decorr_core::io::write_atomic;
use decorr_core::{BackendKind, ModelSource, select_device};
use decorr_eval::bertscore::{ScoreOptions, Scorer};
use decorr_eval::captioner::{Answer, Captioner, CaptionerConfig, ImageInput, read_captions_file};
use decorr_eval::fid::{ActivationStats, frechet_distance, stats_of_path};
use decorr_eval::inception::{FidInception, load_inception};
use decorr_eval::npz::{NpyArray, read_npz, write_npz};
use decorr_eval::report::{ImageResult, Prf, Report};

use crate::bail;
use crate::charts;
use crate::error::{Context, Result};
use crate::generate::{ImageRecord, MANIFEST, read_manifest};
use crate::progress::Progress;
use crate::shard::Shard;

/// bert_score's recommended model, as the paper used it (layer 40).
pub const DEFAULT_SCORER: &str = "microsoft/deberta-xlarge-mnli";
/// Where pytorch-fid keeps its Inception weights after its first run.
pub const FID_WEIGHTS_FILE: &str = "pt_inception-2015-12-05-6726825d.pth";
pub const FID_WEIGHTS_URL: &str = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth";

/// What `decorr eval run` was asked to do (its flags).
#[derive(Debug, Clone)]
pub struct EvalRunConfig {
    /// Folders written by `decorr generate` (a folder with `manifest.json`, or one whose
    /// sub-folders have one).
    pub runs: Vec<PathBuf>,
    /// Reference images for FID: a folder, or its statistics as `.npz`. No FID without it.
    pub reference_images: Option<PathBuf>,
    /// pytorch-fid's Inception weights (default: pytorch-fid's cached copy).
    pub inception: Option<PathBuf>,
    /// OpenAI-compatible endpoint for captions and yes/no questions.
    pub captioner: Option<String>,
    pub captioner_model: String,
    pub caption_instruction: Option<String>,
    pub concurrency: usize,
    /// Seconds one request may take.
    pub timeout: f64,
    /// Captions made elsewhere (JSONL), used before asking.
    pub captions: Option<PathBuf>,
    /// The object pair of every prompt, `[FIRST, TARGET]` (empty: none, or `objects_file`).
    pub objects: Vec<String>,
    /// Object pairs per prompt: JSON `{"PROMPT": ["FIRST", "TARGET"], ...}`.
    pub objects_file: Option<PathBuf>,
    pub bertscore_model: String,
    pub bertscore_layer: Option<usize>,
    pub idf: bool,
    pub bertscore_prefix_space: bool,
    pub shard: Option<Shard>,
    pub merge: bool,
    pub batch_size: usize,
    /// Output folder (report files, caches, partial results).
    pub out: PathBuf,
    pub backend: BackendKind,
    pub gpu: usize,
}

impl EvalRunConfig {
    fn device(&self) -> Result<Device> {
        Ok(select_device(self.backend, self.gpu)?)
    }
}

/// What an evaluation ended with.
pub enum EvalOutcome {
    /// One shard's images were evaluated; `--merge` makes the report once every shard is done.
    Shard { shard: Shard, images: usize },
    /// The report was written to OUT.
    Report { report: Report, images: usize },
}

/// A scoring model's folder: `spec` itself when it is a folder, else the hub snapshot holding
/// its files (downloaded through the HF cache).
pub fn model_dir(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() || spec.starts_with('.') || spec.starts_with('/') {
        bail!("--model {spec}: not a folder; give a model folder or a hub repo id");
    }
    let hub = ModelSource::hub(spec);
    let config = hub.find("", &["config.json"])?;
    hub.find("", &["model.safetensors", "pytorch_model.bin"])?;
    // Tokenizer files: whichever the repo has.
    for f in [
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "vocab.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let _ = hub.find_optional("", &[f]);
    }
    Ok(config.parent().expect("a file has a folder").to_path_buf())
}

pub fn load_scorer(
    spec: &str,
    layer: Option<usize>,
    prefix_space: bool,
    device: &Device,
) -> Result<Scorer> {
    let dir = model_dir(spec)?;
    decorr_eval::bertscore::load_scorer(&dir, layer, prefix_space, device)
        .with_context(|| format!("loading the BERTScore model {spec}"))
}

pub fn inception_path(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let home = std::env::var_os("TORCH_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/torch")));
    let cached = home.map(|h| h.join("hub/checkpoints").join(FID_WEIGHTS_FILE));
    match cached {
        Some(p) if p.is_file() => Ok(p),
        _ => bail!(
            "no Inception weights: pass --inception FILE. Download pytorch-fid's weights once from \
             {FID_WEIGHTS_URL} (pytorch-fid also caches them under ~/.cache/torch/hub/checkpoints/)"
        ),
    }
}

/// One image of a run folder.
#[derive(Clone)]
struct Item {
    run: PathBuf,
    record: ImageRecord,
}

impl Item {
    fn path(&self) -> PathBuf {
        self.run.join(&self.record.file)
    }
    fn key(&self) -> String {
        format!("{}/{}", self.run.display(), self.record.file)
    }
}

/// Every image the run folders list (each `--runs` folder, or its prompt sub-folders), as
/// (the manifest's folder, its record), checked to exist inside that folder: for other
/// readers of runs (the human study).
pub fn run_images(runs: &[PathBuf]) -> Result<Vec<(PathBuf, ImageRecord)>> {
    Ok(collect_items(runs)?
        .into_iter()
        .map(|i| (i.run, i.record))
        .collect())
}

/// Every image the runs list, in a fixed order (runs as given, then seed).
fn collect_items(runs: &[PathBuf]) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    for run in runs {
        if !run.is_dir() {
            bail!("--runs {}: no such folder", run.display());
        }
        let mut folders = Vec::new();
        if run.join(MANIFEST).is_file() {
            folders.push(run.clone());
        } else {
            let mut subs: Vec<PathBuf> = std::fs::read_dir(run)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join(MANIFEST).is_file())
                .collect();
            subs.sort();
            folders.extend(subs);
        }
        if folders.is_empty() {
            bail!(
                "{} has no manifest.json (nor sub-folders with one): point --runs at a \
                 `decorr generate` output; after a sharded generate, run it with --merge first",
                run.display()
            );
        }
        for f in folders {
            for record in read_manifest(&f)?.images {
                // Only files inside the manifest's own folder (no absolute paths, no `..`, no
                // symbolic links leading out of it).
                crate::paths::inside(&f, &f.join(MANIFEST), &record.file)?;
                let item = Item {
                    run: f.clone(),
                    record,
                };
                if !item.path().is_file() {
                    bail!(
                        "{} lists {} but the file is missing; rerun the generate command to remake it",
                        f.join(MANIFEST).display(),
                        item.record.file
                    );
                }
                items.push(item);
            }
        }
    }
    Ok(items)
}

/// The object pair of each prompt.
fn pairs_of(a: &EvalRunConfig, items: &[Item]) -> Result<HashMap<String, [String; 2]>> {
    let mut map = HashMap::new();
    if let Some(f) = &a.objects_file {
        let text = decorr_core::input::read_text(f, "the --objects-file (JSON)")?;
        let m: BTreeMap<String, [String; 2]> = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: expected {{\"PROMPT\": [\"FIRST\", \"TARGET\"], ...}}",
                f.display()
            )
        })?;
        map.extend(m);
        let missing: BTreeSet<&str> = items
            .iter()
            .map(|i| i.record.run.prompt.as_str())
            .filter(|p| !map.contains_key(*p))
            .collect();
        if !missing.is_empty() {
            bail!(
                "{} names no object pair for: {}",
                f.display(),
                missing.into_iter().collect::<Vec<_>>().join(" | ")
            );
        }
    } else if !a.objects.is_empty() {
        let [first, target] = a.objects.as_slice() else {
            bail!(
                "--objects takes two objects, FIRST,TARGET (e.g. tracks,train); got {}",
                a.objects.len()
            );
        };
        for i in items {
            map.insert(
                i.record.run.prompt.clone(),
                [first.trim().to_string(), target.trim().to_string()],
            );
        }
    }
    Ok(map)
}

/// Evaluates the runs of `a` (one shard of them, or all), or with `a.merge` joins the shards'
/// partial results, and writes the report.
pub fn run(a: &EvalRunConfig, progress: &mut dyn Progress) -> Result<EvalOutcome> {
    let items = collect_items(&a.runs)?;
    if items.is_empty() {
        bail!("the --runs folders list no images");
    }
    let pairs = pairs_of(a, &items)?;
    let partial = a.out.join("partial");
    std::fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let _locks = crate::output::lock_output(&a.out, a.shard, a.merge)?;
    if a.merge {
        return merge(a, &items);
    }
    let shard = a.shard.unwrap_or(Shard { index: 0, count: 1 });
    let mine: Vec<&Item> = items
        .iter()
        .enumerate()
        .filter(|(j, _)| shard.owns(*j))
        .map(|(_, i)| i)
        .collect();
    let device = a.device()?;
    let inputs: Vec<ImageInput> = mine
        .iter()
        .map(|i| ImageInput::from_path(i.path()))
        .collect();

    // Captions: from the file first, then from the endpoint.
    let given = a.captions.as_deref().map(read_captions_file).transpose()?;
    let captioner = match &a.captioner {
        Some(url) => {
            let mut cfg = CaptionerConfig {
                url: url.clone(),
                model: a.captioner_model.clone(),
                api_key: std::env::var("OPENAI_API_KEY").ok(),
                concurrency: a.concurrency.max(1),
                timeout: std::time::Duration::from_secs_f64(a.timeout.max(1.0)),
                ..CaptionerConfig::default()
            };
            if let Some(i) = &a.caption_instruction {
                cfg.caption_instruction = i.clone();
            }
            let cache = a.out.join(format!("vlm-cache.{}.jsonl", shard.tag()));
            Some(Captioner::new(cfg, Some(&cache))?)
        }
        None => None,
    };
    let mut captions: Vec<Option<String>> = vec![None; mine.len()];
    if let Some(g) = &given {
        for (k, i) in mine.iter().enumerate() {
            captions[k] = decorr_eval::captioner::caption_for(g, &i.path()).map(str::to_string);
        }
    }
    let ask: Vec<usize> = (0..mine.len()).filter(|&k| captions[k].is_none()).collect();
    match (&captioner, ask.is_empty(), &given) {
        (Some(c), false, _) => {
            progress.note(&format!(
                "captioning {} images through {}",
                ask.len(),
                c.shown_endpoint()
            ));
            let got = c.caption_all(&ask.iter().map(|&k| inputs[k].clone()).collect::<Vec<_>>())?;
            for (k, cap) in ask.iter().zip(got) {
                captions[*k] = Some(cap);
            }
        }
        (None, false, Some(_)) => bail!(
            "--captions has no caption for {} of the images (e.g. {}); add them or pass --captioner URL",
            ask.len(),
            mine[ask[0]].path().display()
        ),
        _ => {}
    }

    if captioner.is_some() && pairs.is_empty() {
        progress.note(
            "no --objects / --objects-file: captions only, the omission rate is not computed",
        );
    }
    // Yes/no answers for both objects of the pair.
    let mut answers: Vec<BTreeMap<String, Answer>> = vec![BTreeMap::new(); mine.len()];
    if let Some(c) = &captioner {
        let mut queries = Vec::new();
        let mut slots = Vec::new();
        for (k, i) in mine.iter().enumerate() {
            if let Some(pair) = pairs.get(&i.record.run.prompt) {
                for o in pair {
                    queries.push((inputs[k].clone(), o.clone()));
                    slots.push((k, o.clone()));
                }
            }
        }
        if !queries.is_empty() {
            progress.note(&format!("asking {} yes/no questions", queries.len()));
            for ((k, o), ans) in slots.into_iter().zip(c.ask_all(&queries)?) {
                answers[k].insert(o, ans);
            }
        }
    }

    // BERTScore recall of each caption (candidate) against its prompt (reference).
    let mut scores: Vec<Option<Prf>> = vec![None; mine.len()];
    let scored: Vec<usize> = (0..mine.len()).filter(|&k| captions[k].is_some()).collect();
    if !scored.is_empty() {
        let scorer = load_scorer(
            &a.bertscore_model,
            a.bertscore_layer,
            a.bertscore_prefix_space,
            &device,
        )?;
        let cands: Vec<String> = scored
            .iter()
            .map(|&k| captions[k].clone().unwrap_or_default())
            .collect();
        let refs: Vec<String> = scored
            .iter()
            .map(|&k| mine[k].record.run.prompt.clone())
            .collect();
        let opts = ScoreOptions {
            idf: a.idf,
            baseline: None,
            batch_size: a.batch_size.max(1),
        };
        for (k, s) in scored.iter().zip(scorer.score(&cands, &refs, &opts)?) {
            scores[*k] = Some(Prf {
                precision: s.precision,
                recall: s.recall,
                f1: s.f1,
            });
        }
    }

    // Inception features, for the FID the merge computes per method.
    if a.reference_images.is_some() {
        let net = load_inception(&inception_path(a.inception.as_deref())?, &device)?;
        let paths: Vec<PathBuf> = mine.iter().map(|i| i.path()).collect();
        let feats = decorr_eval::fid::features_of_files(&net, &paths, a.batch_size, &device)?;
        let dims = feats.len() / mine.len().max(1);
        // f32 features stored as f64: exact, and the .npz stays readable by numpy.
        let flat: Vec<f64> = feats.into_iter().map(f64::from).collect();
        let arr = NpyArray::new(vec![mine.len(), dims], flat);
        write_npz(
            &partial.join(format!("features.{}.npz", shard.tag())),
            &[("features", &arr)],
        )?;
    }

    let results: Vec<ImageResult> = mine
        .iter()
        .enumerate()
        .map(|(k, i)| ImageResult {
            run: i.run.display().to_string(),
            method: i.record.run.method.clone(),
            prompt: i.record.run.prompt.clone(),
            seed: i.record.seed,
            file: i.record.file.clone(),
            caption: captions[k].clone(),
            bertscore: scores[k],
            pair: pairs.get(&i.record.run.prompt).cloned(),
            answers: answers[k].clone(),
        })
        .collect();
    let mut jsonl = String::new();
    for r in &results {
        jsonl += &serde_json::to_string(r)?;
        jsonl.push('\n');
    }
    write_atomic(
        &partial.join(format!("results.{}.jsonl", shard.tag())),
        jsonl.as_bytes(),
    )?;
    if a.shard.is_some() {
        return Ok(EvalOutcome::Shard {
            shard,
            images: mine.len(),
        });
    }
    merge(a, &items)
}

/// What a reference folder's statistics depend on: the folder, each image's name, size and
/// modification time, and the Inception weights named.
fn reference_key(reference: &Path, weights: Option<&Path>) -> Result<String> {
    let mut key = format!(
        "folder {}\nweights {}\n",
        reference.display(),
        weights.map_or("(pytorch-fid's cached file)".into(), |w| w
            .display()
            .to_string())
    );
    for f in decorr_eval::fid::list_images(reference)? {
        let m = std::fs::metadata(&f).with_context(|| format!("reading {}", f.display()))?;
        let modified = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        key += &format!("{} {} {modified}\n", f.display(), m.len());
    }
    Ok(key)
}

/// Joins the partial results of every shard (or the one unsharded pass), computes FID per
/// method and writes the report.
fn merge(a: &EvalRunConfig, items: &[Item]) -> Result<EvalOutcome> {
    let partial = a.out.join("partial");
    let mut counts = BTreeSet::new();
    let mut results: HashMap<String, ImageResult> = HashMap::new();
    let mut features: HashMap<String, Vec<f64>> = HashMap::new();
    for entry in std::fs::read_dir(&partial)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(tag) = name
            .strip_prefix("results.")
            .and_then(|t| t.strip_suffix(".jsonl"))
        else {
            continue;
        };
        counts.insert(tag.rsplit("-of-").next().unwrap_or("").to_string());
        let path = partial.join(&name);
        let text = std::fs::read_to_string(&path)?;
        let rs: Vec<ImageResult> = decorr_core::io::strip_bom(&text)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .with_context(|| format!("{} is not a results file of decorr eval", path.display()))?;
        let fpath = partial.join(format!("features.{tag}.npz"));
        let feats = if fpath.is_file() {
            let arrays = read_npz(&fpath)?;
            let arr = arrays
                .get("features")
                .with_context(|| format!("{} has no `features` array", fpath.display()))?;
            let dims = arr.shape.get(1).copied().unwrap_or(0);
            if arr.shape.first() != Some(&rs.len()) {
                bail!(
                    "{} does not match {}; rerun that shard",
                    fpath.display(),
                    path.display()
                );
            }
            Some((arr.data.clone(), dims))
        } else {
            None
        };
        for (k, r) in rs.into_iter().enumerate() {
            let key = format!("{}/{}", r.run, r.file);
            if let Some((data, dims)) = &feats {
                features.insert(key.clone(), data[k * dims..(k + 1) * dims].to_vec());
            }
            results.insert(key, r);
        }
    }
    if counts.len() > 1 {
        bail!(
            "{} holds partial results of different shard counts ({}); remove the stale ones",
            partial.display(),
            counts.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    let missing: Vec<(usize, &Item)> = items
        .iter()
        .enumerate()
        .filter(|(_, i)| !results.contains_key(&i.key()))
        .collect();
    if !missing.is_empty() {
        let n = counts.iter().next().and_then(|c| c.parse::<usize>().ok());
        let owed: BTreeSet<usize> = missing
            .iter()
            .map(|(j, _)| n.map_or(0, |n| j % n))
            .collect();
        bail!(
            "{} of {} images have no results yet (e.g. {}); {}",
            missing.len(),
            items.len(),
            missing[0].1.path().display(),
            match n {
                Some(n) => format!(
                    "run shard(s) {} of {n} first",
                    owed.iter()
                        .map(|k| k.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None => "run `decorr eval run` without --merge first".to_string(),
            }
        );
    }
    let ordered: Vec<ImageResult> = items.iter().map(|i| results[&i.key()].clone()).collect();

    // FID per method against the reference images.
    let mut fid = BTreeMap::new();
    if let Some(reference) = &a.reference_images {
        let device = a.device()?;
        // A folder's statistics are kept in OUT and reused while the folder and the weights
        // are unchanged (reference-stats.key says what they were computed from).
        let cached = a.out.join("reference-stats.npz");
        let key_file = a.out.join("reference-stats.key");
        let key = reference
            .is_dir()
            .then(|| reference_key(reference, a.inception.as_deref()))
            .transpose()?;
        let fresh =
            key.is_some() && cached.is_file() && std::fs::read_to_string(&key_file).ok() == key;
        let reference_stats = if fresh {
            decorr_eval::npz::read_stats(&cached)?
        } else {
            let net = || -> Result<FidInception> {
                Ok(load_inception(
                    &inception_path(a.inception.as_deref())?,
                    &device,
                )?)
            };
            let s = stats_of_path(reference, net, a.batch_size, &device)?;
            if let Some(key) = &key {
                decorr_eval::npz::write_stats(&cached, &s)?;
                write_atomic(&key_file, key.as_bytes())?;
            }
            s
        };
        let mut by_method: BTreeMap<&str, Vec<f32>> = BTreeMap::new();
        for i in items {
            let f = features.get(&i.key()).with_context(|| {
                format!(
                    "no Inception features for {}: the partial results were made without \
                     --reference-images; rerun them with it",
                    i.path().display()
                )
            })?;
            by_method
                .entry(&i.record.run.method)
                .or_default()
                .extend(f.iter().map(|&v| v as f32));
        }
        for (m, feats) in by_method {
            let stats = ActivationStats::from_features(&feats, reference_stats.dim())?;
            fid.insert(m.to_string(), frechet_distance(&reference_stats, &stats)?);
        }
    }

    let report = Report::build(&ordered, &fid);
    std::fs::create_dir_all(&a.out)?;
    write_atomic(&a.out.join("report.md"), report.markdown().as_bytes())?;
    write_atomic(&a.out.join("report.csv"), report.csv().as_bytes())?;
    let json = serde_json::json!({
        "report": report,
        "fid": fid,
        "images": ordered,
        "settings": {
            "bertscore_model": a.bertscore_model,
            "bertscore_layer": a.bertscore_layer,
            "idf": a.idf,
            "prefix_space": a.bertscore_prefix_space,
            // Credentials in the URL never reach the report.
            "captioner": a.captioner.as_deref().map(decorr_eval::captioner::redact_url),
            "captioner_model": a.captioner_model,
            "reference_images": a.reference_images,
        },
    });
    write_atomic(
        &a.out.join("report.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    let overall = &report.tables[0].rows;
    let labels: Vec<String> = overall.iter().map(|r| r.method.clone()).collect();
    let panels = [
        charts::Bars {
            name: "BERTScore recall (mean)",
            y_label: "recall",
            labels: labels.clone(),
            values: overall
                .iter()
                .map(|r| r.bertscore_recall.map_or(f64::NAN, |m| m.0))
                .collect(),
            intervals: overall
                .iter()
                .map(|r| r.bertscore_recall.map(|(m, s)| (m - s, m + s)))
                .collect(),
            interval_label: "± 1 std",
        },
        charts::Bars {
            name: "FID (lower is better)",
            y_label: "FID",
            labels: labels.clone(),
            values: overall.iter().map(|r| r.fid.unwrap_or(f64::NAN)).collect(),
            intervals: vec![None; overall.len()],
            interval_label: "",
        },
        charts::Bars {
            name: "omission rate (95% CI)",
            y_label: "share of images",
            labels,
            values: overall
                .iter()
                .map(|r| r.omission.map_or(f64::NAN, |o| o.rate))
                .collect(),
            intervals: overall
                .iter()
                .map(|r| r.omission.filter(|o| o.total > 0).map(|o| (o.low, o.high)))
                .collect(),
            interval_label: "95% Wilson interval",
        },
    ];
    charts::bars(&format!("decorr eval: {} images", ordered.len()), &panels)?
        .write(&a.out, "report")?;
    Ok(EvalOutcome::Report {
        report,
        images: ordered.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cached reference statistics are reused only for the same images and weights.
    #[test]
    fn reference_key_follows_the_folder_and_the_weights() {
        let dir = tempfile::tempdir().unwrap();
        let png = |name: &str, v: u8| {
            image::RgbImage::from_pixel(4, 4, image::Rgb([v, v, v]))
                .save(dir.path().join(name))
                .unwrap()
        };
        png("a.png", 1);
        png("b.png", 2);
        let key = reference_key(dir.path(), None).unwrap();
        assert_eq!(key, reference_key(dir.path(), None).unwrap());
        assert_ne!(
            key,
            reference_key(dir.path(), Some(Path::new("w.pth"))).unwrap()
        );
        png("c.png", 3);
        let more = reference_key(dir.path(), None).unwrap();
        assert_ne!(key, more, "an added image");
        std::fs::write(dir.path().join("c.png"), b"not the same bytes").unwrap();
        assert_ne!(
            more,
            reference_key(dir.path(), None).unwrap(),
            "a changed image"
        );
    }
}
