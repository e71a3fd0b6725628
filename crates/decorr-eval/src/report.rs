//! The evaluation report in the form of the paper's table 3: one row per method (SD, our
//! decorrelated guidance, ...) with BERTScore recall mean ± std, FID and our omission rate,
//! overall, per object pair and per prompt; as Markdown, CSV and JSON. The per-image results
//! it is built from are what `decorr eval run` records (and its shards write).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::captioner::Answer;
use crate::omission::OmissionRate;

/// BERTScore of one caption (candidate) against its prompt (reference).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prf {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// Everything measured on one generated image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageResult {
    /// The run folder the image came from.
    pub run: String,
    /// `sd`, `pag`, `aae`, `disendiff`, `ours`, `finetuned-cfg`, ...: the table's rows.
    pub method: String,
    pub prompt: String,
    pub seed: u64,
    /// The image's file name inside `run`.
    pub file: String,
    pub caption: Option<String>,
    pub bertscore: Option<Prf>,
    /// The object pair of the prompt: `[first, target]`; the target is the one that goes missing.
    pub pair: Option<[String; 2]>,
    /// The VLM's answer to "is there {object}?", per object of the pair.
    #[serde(default)]
    pub answers: BTreeMap<String, Answer>,
}

/// One method's numbers over a group of images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub method: String,
    pub images: usize,
    /// Mean and population standard deviation (numpy's default `ddof=0`) over the images.
    pub bertscore_recall: Option<(f64, f64)>,
    pub bertscore_f1: Option<f64>,
    /// FID against the reference images (overall rows only: it needs many images).
    pub fid: Option<f64>,
    /// Share of images whose target object the VLM says is absent.
    pub omission: Option<OmissionRate>,
    /// Share of images (with clear answers for both) where both objects are present.
    pub both_present: Option<f64>,
}

/// A table: rows of one group of images (all, one object pair or one prompt).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Table {
    /// `overall`, `pair` or `prompt`.
    pub kind: String,
    /// `all`, `tracks/train`, or the prompt text.
    pub group: String,
    pub rows: Vec<Row>,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub tables: Vec<Table>,
}

/// Methods in the order the paper's table lists them (baselines first, ours last; results
/// an older decorr wrote say `decorrelated` for ours); unknown ones after, alphabetically.
fn method_rank(m: &str) -> (usize, String) {
    let rank = [
        "sd",
        "pag",
        "aae",
        "disendiff",
        "finetuned-cfg",
        "ours",
        "decorrelated",
    ]
    .iter()
    .position(|k| *k == m)
    .unwrap_or(usize::MAX);
    (rank, m.to_string())
}

fn mean_std(values: &[f64]) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    Some((mean, var.sqrt()))
}

fn row(method: &str, images: &[&ImageResult], fid: Option<f64>) -> Row {
    let recall: Vec<f64> = images
        .iter()
        .filter_map(|r| r.bertscore.map(|b| b.recall))
        .collect();
    let f1: Vec<f64> = images
        .iter()
        .filter_map(|r| r.bertscore.map(|b| b.f1))
        .collect();
    let target_answers: Vec<Answer> = images
        .iter()
        .filter_map(|r| {
            let pair = r.pair.as_ref()?;
            r.answers.get(&pair[1]).cloned()
        })
        .collect();
    let both: Vec<bool> = images
        .iter()
        .filter_map(|r| {
            let pair = r.pair.as_ref()?;
            let clear = |o: &String| match r.answers.get(o)? {
                Answer::Yes => Some(true),
                Answer::No => Some(false),
                Answer::Unclear(_) => None,
            };
            Some(clear(&pair[0])? && clear(&pair[1])?)
        })
        .collect();
    Row {
        method: method.to_string(),
        images: images.len(),
        bertscore_recall: mean_std(&recall),
        bertscore_f1: mean_std(&f1).map(|m| m.0),
        fid,
        omission: (!target_answers.is_empty()).then(|| OmissionRate::from_answers(&target_answers)),
        both_present: (!both.is_empty())
            .then(|| both.iter().filter(|b| **b).count() as f64 / both.len() as f64),
    }
}

fn table(kind: &str, group: &str, images: &[&ImageResult], fid: &BTreeMap<String, f64>) -> Table {
    let mut by_method: BTreeMap<(usize, String), Vec<&ImageResult>> = BTreeMap::new();
    for r in images {
        by_method.entry(method_rank(&r.method)).or_default().push(r);
    }
    Table {
        kind: kind.to_string(),
        group: group.to_string(),
        rows: by_method
            .into_iter()
            .map(|((_, m), imgs)| {
                let f = (kind == "overall").then(|| fid.get(&m).copied()).flatten();
                row(&m, &imgs, f)
            })
            .collect(),
    }
}

impl Report {
    /// Groups `results` overall, per object pair and per prompt; `fid` holds each method's FID.
    pub fn build(results: &[ImageResult], fid: &BTreeMap<String, f64>) -> Report {
        let all: Vec<&ImageResult> = results.iter().collect();
        let mut tables = vec![table("overall", "all", &all, fid)];
        let mut pairs: BTreeMap<String, Vec<&ImageResult>> = BTreeMap::new();
        let mut prompts: BTreeMap<String, Vec<&ImageResult>> = BTreeMap::new();
        for r in results {
            if let Some([a, b]) = &r.pair {
                pairs.entry(format!("{a}/{b}")).or_default().push(r);
            }
            prompts.entry(r.prompt.clone()).or_default().push(r);
        }
        if pairs.len() > 1 {
            tables.extend(pairs.iter().map(|(g, imgs)| table("pair", g, imgs, fid)));
        }
        if prompts.len() > 1 {
            tables.extend(
                prompts
                    .iter()
                    .map(|(g, imgs)| table("prompt", g, imgs, fid)),
            );
        }
        Report { tables }
    }

    /// Markdown: one table per group, the overall one first.
    pub fn markdown(&self) -> String {
        let mut s = String::from("# Evaluation\n");
        for t in &self.tables {
            let title = match t.kind.as_str() {
                "overall" => "All images".to_string(),
                "pair" => format!("Object pair {}", t.group),
                _ => format!("Prompt \"{}\"", t.group),
            };
            s += &format!(
                "\n## {title}\n\n| method | images | BERTScore recall | BERTScore F1 | FID | omission rate (95% CI) | both objects |\n|---|---:|---:|---:|---:|---:|---:|\n"
            );
            for r in &t.rows {
                s += &format!(
                    "| {} | {} | {} | {} | {} | {} | {} |\n",
                    r.method,
                    r.images,
                    r.bertscore_recall
                        .map_or("n/a".into(), |(m, sd)| format!("{m:.4} ± {sd:.4}")),
                    r.bertscore_f1.map_or("n/a".into(), |f| format!("{f:.4}")),
                    r.fid.map_or("n/a".into(), |f| format!("{f:.2}")),
                    r.omission.map_or("n/a".into(), |o| if o.total == 0 {
                        "n/a".into()
                    } else {
                        format!(
                            "{:.1}% ({}/{}; {:.1}–{:.1}%)",
                            100.0 * o.rate,
                            o.missing,
                            o.total,
                            100.0 * o.low,
                            100.0 * o.high
                        )
                    }),
                    r.both_present
                        .map_or("n/a".into(), |b| format!("{:.1}%", 100.0 * b)),
                );
            }
        }
        s
    }

    /// CSV, one line per (table, method); empty cells where a metric was not computed.
    pub fn csv(&self) -> String {
        let mut s = String::from(
            "table,group,method,images,bertscore_recall_mean,bertscore_recall_std,bertscore_f1_mean,fid,omission_rate,omission_low,omission_high,omission_missing,omission_clear_answers,omission_unclear,both_present\n",
        );
        let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v}"));
        let quote = |t: &str| format!("\"{}\"", t.replace('"', "\"\""));
        for t in &self.tables {
            for r in &t.rows {
                let o = r.omission.filter(|o| o.total > 0);
                s += &[
                    t.kind.clone(),
                    quote(&t.group),
                    quote(&r.method),
                    r.images.to_string(),
                    opt(r.bertscore_recall.map(|m| m.0)),
                    opt(r.bertscore_recall.map(|m| m.1)),
                    opt(r.bertscore_f1),
                    opt(r.fid),
                    opt(o.map(|o| o.rate)),
                    opt(o.map(|o| o.low)),
                    opt(o.map(|o| o.high)),
                    r.omission.map_or(String::new(), |o| o.missing.to_string()),
                    r.omission.map_or(String::new(), |o| o.total.to_string()),
                    r.omission.map_or(String::new(), |o| o.unclear.to_string()),
                    opt(r.both_present),
                ]
                .join(",");
                s.push('\n');
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(method: &str, prompt: &str, seed: u64, recall: f64, target: Answer) -> ImageResult {
        let pair = if prompt.contains("train") {
            ["tracks", "train"]
        } else {
            ["cat", "hat"]
        };
        ImageResult {
            run: format!("runs/{method}"),
            method: method.into(),
            prompt: prompt.into(),
            seed,
            file: format!("seed-{seed:06}.png"),
            caption: Some("a caption".into()),
            bertscore: Some(Prf {
                precision: recall - 0.1,
                recall,
                f1: recall - 0.05,
            }),
            pair: Some(pair.map(String::from)),
            answers: [
                (pair[0].to_string(), Answer::Yes),
                (pair[1].to_string(), target),
            ]
            .into_iter()
            .collect(),
        }
    }

    fn synthetic() -> Vec<ImageResult> {
        use Answer::*;
        let t = "rusty tracks with an old train";
        let c = "a cat in a hat";
        vec![
            img("decorrelated", t, 0, 0.8, Yes),
            img("decorrelated", t, 1, 0.6, Yes),
            img("decorrelated", c, 0, 0.7, No),
            img("sd", t, 0, 0.5, No),
            img("sd", t, 1, 0.7, No),
            img("sd", c, 0, 0.6, Unclear("maybe".into())),
        ]
    }

    #[test]
    fn rows_group_and_compute_as_by_hand() {
        let fid: BTreeMap<String, f64> = [("sd".to_string(), 40.0), ("decorrelated".into(), 35.5)]
            .into_iter()
            .collect();
        let r = Report::build(&synthetic(), &fid);
        // overall + 2 pairs + 2 prompts
        assert_eq!(r.tables.len(), 5);
        let all = &r.tables[0];
        assert_eq!(all.rows[0].method, "sd", "paper order: SD first");
        let sd = &all.rows[0];
        assert_eq!(sd.images, 3);
        let (m, s) = sd.bertscore_recall.unwrap();
        assert!((m - 0.6).abs() < 1e-12);
        assert!((s - (0.02f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(sd.fid, Some(40.0));
        let o = sd.omission.unwrap();
        assert_eq!((o.missing, o.total, o.unclear), (2, 2, 1));
        let dec = &all.rows[1];
        let o = dec.omission.unwrap();
        assert_eq!((o.missing, o.total), (1, 3));
        assert!((dec.both_present.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        let pair = r.tables.iter().find(|t| t.group == "tracks/train").unwrap();
        assert_eq!(pair.rows[0].fid, None, "FID only overall");
        assert_eq!(pair.rows[1].omission.unwrap().missing, 0);

        let md = r.markdown();
        assert!(md.contains("| sd | 3 | 0.6000 ± 0.0816 |"), "{md}");
        assert!(md.contains("## Object pair tracks/train"), "{md}");
        assert!(md.contains("100.0% (2/2;"), "{md}");
        let csv = r.csv();
        assert_eq!(csv.lines().count(), 1 + 2 * 5);
        assert!(
            csv.lines()
                .nth(1)
                .unwrap()
                .starts_with("overall,\"all\",\"sd\",3,0.6")
        );
    }

    #[test]
    fn missing_metrics_are_n_a_not_zero() {
        let mut results = synthetic();
        for r in &mut results {
            r.bertscore = None;
            r.answers.clear();
        }
        let r = Report::build(&results, &BTreeMap::new());
        let row = &r.tables[0].rows[0];
        assert_eq!(row.bertscore_recall, None);
        assert_eq!(row.omission, None);
        assert!(
            r.markdown()
                .contains("| sd | 3 | n/a | n/a | n/a | n/a | n/a |")
        );
        let json = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }
}
