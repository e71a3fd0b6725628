//! `decorr study report`: the paper's table 4 from the answers (one row per method: alignment
//! and fidelity, mean over all ratings +- the sample standard deviation, ratings and raters
//! counted), and what the paper lacks: bootstrap 95% intervals of the means, per-rater means,
//! inter-rater agreement (Krippendorff's alpha, ordinal), each rater's consistency on repeated
//! comparisons, and a paired Wilcoxon signed-rank test of each method against the baseline.
//!
//! Only first showings enter the table, the agreement and the tests; repeated showings serve the
//! consistency alone.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::db::{self, AnswerRow};
use crate::{
    StudyError, bootstrap_mean_ci, krippendorff_alpha_ordinal, mean_std, wilcoxon_signed_rank,
};

/// The two 5-point scales.
pub const SCALES: [&str; 2] = ["alignment", "fidelity"];

/// Mean, sample std (ddof 1), count and bootstrap 95% interval of one method's ratings on one
/// scale.
#[derive(Debug, Clone, Serialize)]
pub struct Stat {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
    pub ci95: Option<[f64; 2]>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MethodRow {
    pub alignment: Stat,
    pub fidelity: Stat,
    pub raters: usize,
}

impl MethodRow {
    /// The row's statistics on `scale` (one of [`SCALES`]).
    pub fn scale(&self, scale: &str) -> &Stat {
        if scale == "alignment" {
            &self.alignment
        } else {
            &self.fidelity
        }
    }
}

/// A paired Wilcoxon signed-rank test of a method against the baseline on one scale: pairs
/// are (rater, comparison) with both rated.
#[derive(Debug, Clone, Serialize)]
pub struct Test {
    pub n: usize,
    pub statistic: Option<f64>,
    pub p_value: Option<f64>,
    pub method: Option<String>,
}

/// A rater's agreement with themselves on repeated comparisons (same comparison and method).
#[derive(Debug, Clone, Serialize)]
pub struct Consistency {
    pub pairs: usize,
    /// Share of repeated ratings equal to the first, per scale.
    pub exact: BTreeMap<String, Option<f64>>,
    /// Mean absolute difference, per scale.
    pub mean_abs_diff: BTreeMap<String, Option<f64>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Table 4: method -> its row.
    pub methods: BTreeMap<String, MethodRow>,
    /// Methods in the study's order.
    pub order: Vec<String>,
    pub baseline: String,
    /// Rated images (first showings) and raters with at least one answer.
    pub ratings: usize,
    pub raters: usize,
    /// Comparisons with at least one answer, and (rater, comparison) answers.
    pub comparisons: usize,
    pub comparisons_answered: usize,
    /// Krippendorff's alpha (ordinal) per scale: units are (comparison, method), coders raters.
    pub agreement: BTreeMap<String, Option<f64>>,
    /// rater -> method -> scale -> mean.
    pub per_rater: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>,
    pub consistency: BTreeMap<String, Consistency>,
    /// method -> scale -> test against the baseline.
    pub wilcoxon: BTreeMap<String, BTreeMap<String, Test>>,
    pub bootstrap_resamples: usize,
    pub notes: Vec<String>,
}

fn score(a: &AnswerRow, scale: &str) -> f64 {
    f64::from(if scale == "alignment" {
        a.alignment
    } else {
        a.fidelity
    })
}

/// Computes the report from the study in `dir`.
pub fn build(dir: &Path, baseline: &str, resamples: usize) -> Result<Report, StudyError> {
    let conn = db::open(dir)?;
    let order = db::method_names(&conn)?;
    let seed: u64 = db::meta(&conn, "seed")?
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let all = db::answers(&conn)?;
    let mut notes = Vec::new();
    if !order.iter().any(|m| m == baseline) {
        notes.push(format!(
            "no method is named `{baseline}` (methods: {}); no Wilcoxon tests (pass --baseline)",
            order.join(", ")
        ));
    }
    let first: Vec<&AnswerRow> = all.iter().filter(|a| !a.is_repeat).collect();
    // A first showing by (rater, comparison, method): what the agreement, the consistency and
    // the tests pair up.
    let rated: HashMap<(&str, i64, &str), &AnswerRow> = first
        .iter()
        .map(|a| ((a.rater.as_str(), a.item, a.method.as_str()), *a))
        .collect();
    if first.is_empty() {
        notes.push("no answers yet".into());
    }

    let mut methods = BTreeMap::new();
    for (k, m) in order.iter().enumerate() {
        let rows: Vec<&&AnswerRow> = first.iter().filter(|a| &a.method == m).collect();
        let stat = |scale: &str, salt: u64| -> Result<Stat, StudyError> {
            let xs: Vec<f64> = rows.iter().map(|a| score(a, scale)).collect();
            let (mean, std) = mean_std(&xs);
            let ci95 = if xs.is_empty() {
                None
            } else {
                let (lo, hi) = bootstrap_mean_ci(&xs, resamples, 0.95, seed ^ salt)?;
                Some([lo, hi])
            };
            Ok(Stat {
                mean,
                std,
                n: xs.len(),
                ci95,
            })
        };
        let raters: BTreeSet<&str> = rows.iter().map(|a| a.rater.as_str()).collect();
        methods.insert(
            m.clone(),
            MethodRow {
                alignment: stat("alignment", 2 * k as u64 + 1)?,
                fidelity: stat("fidelity", 2 * k as u64 + 2)?,
                raters: raters.len(),
            },
        );
    }

    let rater_names: Vec<String> = first
        .iter()
        .map(|a| a.rater.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let units: Vec<(i64, String)> = first
        .iter()
        .map(|a| (a.item, a.method.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut agreement = BTreeMap::new();
    for scale in SCALES {
        let data: Vec<Vec<Option<f64>>> = rater_names
            .iter()
            .map(|r| {
                units
                    .iter()
                    .map(|(item, m)| {
                        rated
                            .get(&(r.as_str(), *item, m.as_str()))
                            .map(|a| score(a, scale))
                    })
                    .collect()
            })
            .collect();
        agreement.insert(scale.to_string(), krippendorff_alpha_ordinal(&data));
    }

    let mut per_rater: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>> = BTreeMap::new();
    for r in &rater_names {
        for m in &order {
            let rows: Vec<&&AnswerRow> = first
                .iter()
                .filter(|a| &a.rater == r && &a.method == m)
                .collect();
            if rows.is_empty() {
                continue;
            }
            for scale in SCALES {
                let mean = rows.iter().map(|a| score(a, scale)).sum::<f64>() / rows.len() as f64;
                per_rater
                    .entry(r.clone())
                    .or_default()
                    .entry(m.clone())
                    .or_default()
                    .insert(scale.to_string(), mean);
            }
        }
    }

    let mut consistency = BTreeMap::new();
    for r in &rater_names {
        let pairs: Vec<(&AnswerRow, &AnswerRow)> = all
            .iter()
            .filter(|a| a.is_repeat && &a.rater == r)
            .filter_map(|rep| {
                rated
                    .get(&(rep.rater.as_str(), rep.item, rep.method.as_str()))
                    .map(|f| (*f, rep))
            })
            .collect();
        if pairs.is_empty() {
            continue;
        }
        let mut exact = BTreeMap::new();
        let mut mad = BTreeMap::new();
        for scale in SCALES {
            let n = pairs.len() as f64;
            exact.insert(
                scale.to_string(),
                Some(
                    pairs
                        .iter()
                        .filter(|(f, p)| score(f, scale) == score(p, scale))
                        .count() as f64
                        / n,
                ),
            );
            mad.insert(
                scale.to_string(),
                Some(
                    pairs
                        .iter()
                        .map(|(f, p)| (score(f, scale) - score(p, scale)).abs())
                        .sum::<f64>()
                        / n,
                ),
            );
        }
        consistency.insert(
            r.clone(),
            Consistency {
                pairs: pairs.len(),
                exact,
                mean_abs_diff: mad,
            },
        );
    }

    let mut wilcoxon = BTreeMap::new();
    if order.iter().any(|m| m == baseline) {
        for m in order.iter().filter(|m| *m != baseline) {
            let mut tests = BTreeMap::new();
            for scale in SCALES {
                let (mut x, mut y) = (Vec::new(), Vec::new());
                for a in first.iter().filter(|a| &a.method == m) {
                    if let Some(b) = rated.get(&(a.rater.as_str(), a.item, baseline)) {
                        x.push(score(a, scale));
                        y.push(score(b, scale));
                    }
                }
                let w = wilcoxon_signed_rank(&x, &y);
                tests.insert(
                    scale.to_string(),
                    Test {
                        n: x.len(),
                        statistic: w.as_ref().map(|w| w.statistic),
                        p_value: w.as_ref().map(|w| w.p_value),
                        method: w.as_ref().map(|w| format!("{:?}", w.method).to_lowercase()),
                    },
                );
            }
            wilcoxon.insert(m.clone(), tests);
        }
    }

    Ok(Report {
        methods,
        order,
        baseline: baseline.to_string(),
        ratings: first.len(),
        raters: rater_names.len(),
        comparisons: first.iter().map(|a| a.item).collect::<BTreeSet<_>>().len(),
        comparisons_answered: first
            .iter()
            .map(|a| (a.rater.as_str(), a.item))
            .collect::<BTreeSet<_>>()
            .len(),
        agreement,
        per_rater,
        consistency,
        wilcoxon,
        bootstrap_resamples: resamples,
        notes,
    })
}

fn num(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "n/a".into()
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("n/a".into(), |v| num(v, digits))
}

/// A p value: fixed below 1e-3 would print 0.0000.
fn p_value(v: Option<f64>) -> String {
    match v {
        Some(p) if p > 0.0 && p < 1e-3 => format!("{p:.1e}"),
        other => opt(other, 4),
    }
}

fn cell(s: &Stat) -> String {
    let ci = s.ci95.map_or(String::new(), |[lo, hi]| {
        format!(" [{}, {}]", num(lo, 2), num(hi, 2))
    });
    format!("{} ± {}{ci}", num(s.mean, 2), num(s.std, 2))
}

/// The report as Markdown: table 4, then the statistics beyond it.
pub fn markdown(r: &Report) -> String {
    let mut s = String::from(
        "## Table 4: user study (5-point scales; mean ± sample std [bootstrap 95% interval])\n\n\
         | method | alignment | fidelity | ratings | raters |\n| --- | --- | --- | --- | --- |\n",
    );
    for m in &r.order {
        let row = &r.methods[m];
        s.push_str(&format!(
            "| {m} | {} | {} | {} | {} |\n",
            cell(&row.alignment),
            cell(&row.fidelity),
            row.alignment.n,
            row.raters
        ));
    }
    s.push_str(&format!(
        "\n{} ratings of {} comparisons by {} raters ({} answered comparisons); intervals from \
         {} bootstrap resamples of the ratings.\n",
        r.ratings, r.comparisons, r.raters, r.comparisons_answered, r.bootstrap_resamples
    ));
    s.push_str(&format!(
        "\n### Inter-rater agreement (Krippendorff's alpha, ordinal)\n\nalignment {}, fidelity {}\n",
        opt(r.agreement["alignment"], 3),
        opt(r.agreement["fidelity"], 3)
    ));
    if !r.wilcoxon.is_empty() {
        s.push_str(&format!(
            "\n### Paired Wilcoxon signed-rank tests against `{}` (pairs: same rater and \
             comparison)\n\n| method | alignment: n, W, p | fidelity: n, W, p |\n| --- | --- | --- |\n",
            r.baseline
        ));
        for (m, t) in &r.wilcoxon {
            let c = |t: &Test| format!("{}, {}, {}", t.n, opt(t.statistic, 1), p_value(t.p_value));
            s.push_str(&format!(
                "| {m} | {} | {} |\n",
                c(&t["alignment"]),
                c(&t["fidelity"])
            ));
        }
    }
    if !r.per_rater.is_empty() {
        s.push_str("\n### Per-rater means (alignment / fidelity)\n\n| rater |");
        for m in &r.order {
            s.push_str(&format!(" {m} |"));
        }
        s.push_str("\n| --- |");
        s.push_str(&" --- |".repeat(r.order.len()));
        s.push('\n');
        for (rater, by_method) in &r.per_rater {
            s.push_str(&format!("| {rater} |"));
            for m in &r.order {
                s.push_str(&match by_method.get(m) {
                    Some(v) => format!(" {} / {} |", num(v["alignment"], 2), num(v["fidelity"], 2)),
                    None => " n/a |".into(),
                });
            }
            s.push('\n');
        }
    }
    if !r.consistency.is_empty() {
        s.push_str(
            "\n### Consistency on repeated comparisons (share equal / mean absolute difference)\n\n\
             | rater | pairs | alignment | fidelity |\n| --- | --- | --- | --- |\n",
        );
        for (rater, c) in &r.consistency {
            s.push_str(&format!(
                "| {rater} | {} | {} / {} | {} / {} |\n",
                c.pairs,
                opt(c.exact["alignment"], 2),
                opt(c.mean_abs_diff["alignment"], 2),
                opt(c.exact["fidelity"], 2),
                opt(c.mean_abs_diff["fidelity"], 2)
            ));
        }
    }
    for n in &r.notes {
        s.push_str(&format!("\nNote: {n}\n"));
    }
    s
}

/// Table 4 as CSV: one row per method.
pub fn csv(r: &Report) -> String {
    let mut s = String::from(
        "method,alignment_mean,alignment_std,alignment_n,alignment_ci_lo,alignment_ci_hi,\
         fidelity_mean,fidelity_std,fidelity_n,fidelity_ci_lo,fidelity_ci_hi,raters\n",
    );
    for m in &r.order {
        let row = &r.methods[m];
        let f = |s: &Stat| {
            let [lo, hi] = s.ci95.unwrap_or([f64::NAN; 2]);
            format!("{},{},{},{},{}", s.mean, s.std, s.n, lo, hi)
        };
        let name = crate::csv_cell(m);
        s.push_str(&format!(
            "{name},{},{},{}\n",
            f(&row.alignment),
            f(&row.fidelity),
            row.raters
        ));
    }
    s
}

/// The bar chart: mean per method on each scale, with the bootstrap intervals.
pub fn chart(r: &Report) -> Result<decorr_runs::charts::Chart, StudyError> {
    let panel = |scale: &'static str| {
        let stats: Vec<&Stat> = r.order.iter().map(|m| r.methods[m].scale(scale)).collect();
        decorr_runs::charts::Bars {
            name: scale,
            y_label: "mean rating (1-5)",
            labels: r.order.clone(),
            values: stats.iter().map(|s| s.mean).collect(),
            intervals: stats
                .iter()
                .map(|s| s.ci95.map(|[lo, hi]| (lo, hi)))
                .collect(),
            interval_label: "bootstrap 95% interval",
        }
    };
    Ok(decorr_runs::charts::bars(
        "User study: mean rating (1-5), bootstrap 95% intervals",
        &[panel("alignment"), panel("fidelity")],
    )?)
}

/// Writes `report.md`, `report.csv`, `report.json` and the chart (`report.svg`, `report.png`)
/// into the study folder (and the JSON to `json` too), each atomically. Returns the paths
/// written.
pub fn write(dir: &Path, r: &Report, json: Option<&Path>) -> Result<Vec<PathBuf>, StudyError> {
    let text = serde_json::to_string_pretty(r)?;
    let chart = chart(r)?;
    let mut written = Vec::new();
    for (name, bytes) in [
        ("report.md", markdown(r).into_bytes()),
        ("report.csv", csv(r).into_bytes()),
        ("report.json", text.clone().into_bytes()),
        ("report.svg", chart.svg.into_bytes()),
        ("report.png", chart.png),
    ] {
        let path = dir.join(name);
        decorr_core::io::write_atomic(&path, &bytes).map_err(|e| StudyError::Msg(e.to_string()))?;
        written.push(path);
    }
    if let Some(path) = json {
        decorr_core::io::write_atomic(path, text.as_bytes())
            .map_err(|e| StudyError::Msg(e.to_string()))?;
        written.push(path.to_path_buf());
    }
    Ok(written)
}
