//! The HTML pages decorr writes into its output folders (`fix`'s report.html, `compare`'s
//! index.html), as maud templates: every interpolated text is escaped unless marked otherwise,
//! so a prompt or a token can never inject markup. Links are relative: a folder can be moved or
//! served as it is. Charts are shown as their SVG where one was written.

use std::path::{Path, PathBuf};

use maud::{DOCTYPE, Markup, html};
use serde::Serialize;

use crate::compare::{CompareConfig, Prompt};
use crate::finetune::FinetuneReport;
use crate::generate::{excite_file, image_file};
use crate::method::MethodKind;

/// One method of a `fix` run: a row of its grid and of its report page.
#[derive(Debug, Clone, Serialize)]
pub struct MethodRow {
    pub method: String,
    pub label: String,
    pub dir: PathBuf,
    /// Attend-and-Excite's objects (token indices and tokens).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub excite: Option<(Vec<usize>, Vec<String>)>,
}

/// `path` relative to `root`, with forward slashes (a link).
fn rel(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

const FIX_STYLE: &str = "body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;\
text-align:right}img{max-width:100%;image-rendering:pixelated}.t{background:#fde2e2}\
.c{background:#e0eafc}.maps{display:grid;grid-template-columns:repeat(auto-fill,\
minmax(380px,1fr));gap:1em}figure{margin:0}figcaption{font-size:90%}.wide{overflow-x:auto}";

/// One fine-tuning shown on `fix`'s page.
pub struct FineTuned<'a> {
    /// SDXL: `text_encoder` or `text_encoder_2`; `None` for a checkpoint with one encoder.
    pub encoder: Option<&'a str>,
    pub report: &'a FinetuneReport,
    /// Its folder under the fix folder (`finetune`, `finetune/encoder-N`).
    pub dir: String,
}

/// The target's attention row before and after one fine-tuning, the target's and the
/// correlated token's columns marked.
fn attention_table(f: &FineTuned<'_>) -> Markup {
    let Some(p0) = f.report.prompts.first() else {
        return html! {};
    };
    let (ti, ci) = (p0.target.index, p0.corr.index);
    let after = p0.row_after.as_deref().unwrap_or_default();
    let class = |i: usize| {
        if i == ti {
            Some("t")
        } else if i == ci {
            Some("c")
        } else {
            None
        }
    };
    let row = |name: &str, values: &[f32]| -> Markup {
        html! {
            tr {
                th { (name) }
                @for (i, v) in values.iter().enumerate() {
                    td class=[class(i)] { (format!("{v:.4}")) }
                }
            }
        }
    };
    html! {
        h2 {
            "Self-attention of the target ("
            @if let Some(encoder) = f.encoder { (encoder) ", " }
            "layer " (f.report.config.layer) ", head average)"
        }
        div.wide { table {
            tr {
                th {}
                @for i in 0..p0.row_before.len() {
                    th class=[class(i)] {
                        (p0.tokens.get(i).cloned().unwrap_or_else(|| i.to_string()))
                        @if i == ti { br; small { "target" } }
                        @if i == ci { br; small { "correlated" } }
                    }
                }
            }
            (row("pre-trained", &p0.row_before))
            (row("fine-tuned", after))
        } }
    }
}

/// `fix`'s report page: the target's attention row before and after (the target's and the
/// correlated token's columns marked), the comparison grid (each image once), every method's
/// figure-3 maps per seed (linking the images), the loss curves. `finetune` is the
/// fine-tunings are shown in the order given (SDXL: one per fine-tuned encoder); the first
/// names the target, the correlated token and the selected epoch in the page's first line.
pub fn fix_report(
    prompt: &str,
    fine_tuned: &[FineTuned<'_>],
    seeds: &[u64],
    out: &Path,
    rows: &[MethodRow],
) -> String {
    let Some(report) = fine_tuned.first().map(|f| f.report) else {
        return String::new();
    };
    let Some(p0) = report.prompts.first() else {
        return String::new();
    };
    let (ti, ci) = (p0.target.index, p0.corr.index);
    let page = html! {
        (DOCTYPE)
        html {
            head {
                meta charset="utf-8";
                title { "decorr fix: " (prompt) }
                style { (FIX_STYLE) }
            }
            body {
                h1 { "decorr fix" }
                p {
                    "Prompt: " b { (prompt) } "; target " b { (p0.target.text) }
                    " (token " (ti) "), correlated token " b { (p0.corr.text) }
                    " (token " (ci) "); selected epoch "
                    (report.selected_epoch.map_or("none".to_string(), |e| e.to_string())) "."
                }
                @for f in fine_tuned {
                    (attention_table(f))
                }
                h2 { "Images (same seeds)" }
                img src="comparison.png" alt="comparison grid";
                h2 { "Cross-attention over the denoising (figure 3): correlated token and target" }
                @for r in rows {
                    @if let Some((idx, tokens)) = &r.excite {
                        p {
                            (r.label) " excites "
                            @for (k, (i, t)) in idx.iter().zip(tokens).enumerate() {
                                @if k > 0 { " and " }
                                b { (t) } " (token " (i) ")"
                            }
                            "; per-step losses in " code { (rel(out, &r.dir)) "/excite-SEED.json" } "."
                        }
                    }
                }
                @for s in seeds {
                    div class="maps" {
                        @for r in rows {
                            @let d = rel(out, &r.dir);
                            @let figure = format!("attention-{s:06}.png");
                            figure {
                                @if r.dir.join(&figure).is_file() {
                                    img src={ (d) "/" (figure) }
                                        alt={ "cross-attention over the steps, " (r.label) ", seed " (s) };
                                }
                                figcaption {
                                    (r.label) ", seed " (s) ": "
                                    a href={ (d) "/" (image_file(*s)) } { "image" }
                                    @if r.excite.is_some() {
                                        ", " a href={ (d) "/" (excite_file(*s)) } { "losses" }
                                    }
                                }
                            }
                        }
                    }
                }
                h2 { "Fine-tuning" }
                @for f in fine_tuned {
                    @if let Some(encoder) = f.encoder { h3 { (encoder) } }
                    (chart(out, &format!("{}/losses", f.dir), "loss curves"))
                }
                p {
                    "Numbers: "
                    @for f in fine_tuned {
                        @let numbers = format!("{}/report.json", f.dir);
                        a href=(numbers) { (numbers) } "; "
                    }
                    "images: "
                    @for (k, r) in rows.iter().enumerate() {
                        @let m = format!("{}/manifest.json", rel(out, &r.dir));
                        @if k > 0 { ", " }
                        a href=(m) { (m) }
                    }
                    "."
                }
            }
        }
    };
    page.into_string() + "\n"
}

/// A chart written as `STEM.svg` and `STEM.png` (paths relative to `root`): the SVG, sharp at
/// any zoom, with the PNG linked; or the PNG alone where there is no SVG (a folder written
/// before decorr wrote one, reused as it is).
fn chart(root: &Path, stem: &str, alt: &str) -> Markup {
    let (svg, png) = (format!("{stem}.svg"), format!("{stem}.png"));
    html! {
        @if root.join(&svg).is_file() {
            figure {
                img src=(svg) alt=(alt);
                figcaption { "Also as " a href=(png) { "PNG" } "." }
            }
        } @else {
            img src=(png) alt=(alt);
        }
    }
}

const COMPARE_STYLE: &str = "body{font-family:sans-serif;margin:2em}td,th{padding:2px 6px;\
text-align:left}td img{width:128px;image-rendering:pixelated}";

/// `compare`'s index page: per prompt a table (rows: methods, columns: seeds) showing each
/// image once, with links to its grid picture, the manifests and the trainings.
pub(crate) fn compare_index(c: &CompareConfig, prompts: &[Prompt]) -> String {
    let runs: Vec<&str> = c.methods.iter().map(|m| m.name()).collect();
    let seeds: Vec<String> = c.seeds.iter().map(|s| s.to_string()).collect();
    let page = html! {
        (DOCTYPE)
        html {
            head {
                meta charset="utf-8";
                title { "decorr compare" }
                style { (COMPARE_STYLE) }
            }
            body {
                h1 { "decorr compare" }
                p {
                    (prompts.len()) " prompt(s), " (c.methods.len()) " method(s), seeds "
                    (seeds.join(", ")) ", same seeds in every row. Evaluate with "
                    code {
                        "decorr eval run --runs " (runs.join(" "))
                        " --objects-file objects.json --captioner URL --out eval"
                    }
                    " (run in this folder)."
                }
                @for p in prompts {
                    h2 { (p.pair.prompt) }
                    p {
                        "Objects: " b { (p.pair.objects[0]) } " and " b { (p.pair.objects[1]) }
                        " (the one that goes missing). The same images as one picture: "
                        a href={ "grids/" (p.folder) ".png" } { "grid" } "."
                    }
                    table {
                        tr {
                            th { "method" }
                            @for s in &c.seeds { th { "seed " (s) } }
                        }
                        @for &m in &c.methods {
                            @let dir = format!("{}/{}", m.name(), p.folder);
                            tr {
                                th {
                                    (m.label()) " ("
                                    a href={ (dir) "/manifest.json" } { (m.name()) } ")"
                                    @if m == MethodKind::Ours {
                                        br;
                                        a href={ "encoders/" (p.folder) "/report.json" } { "fine-tuning" } ", "
                                        a href={ "encoders/" (p.folder) "/losses.png" } { "losses" }
                                    }
                                    @if m == MethodKind::Disendiff {
                                        br;
                                        a href={ "disendiff-train/" (p.folder) "/report.json" } { "training" } ", "
                                        a href={ "disendiff-train/" (p.folder) "/losses.png" } { "losses" }
                                    }
                                }
                                @for &s in &c.seeds {
                                    @let f = format!("{dir}/{}", image_file(s));
                                    td { a href=(f) { img src=(f) alt={ (m) " seed " (s) }; } }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    page.into_string() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Markup in a prompt is text on the page, never markup.
    #[test]
    fn text_is_escaped() {
        let page = html! { p { ("<script>alert(1)</script> & \"x\"") } }.into_string();
        assert_eq!(
            page,
            "<p>&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;x&quot;</p>"
        );
    }

    /// The SVG where there is one, else the PNG (an older folder).
    #[test]
    fn charts_show_the_svg_and_fall_back_to_the_png() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("losses.png"), b"png").unwrap();
        let page = chart(dir.path(), "losses", "curves").into_string();
        assert_eq!(page, "<img src=\"losses.png\" alt=\"curves\">");
        std::fs::write(dir.path().join("losses.svg"), b"<svg/>").unwrap();
        let page = chart(dir.path(), "losses", "curves").into_string();
        assert!(
            page.contains("<img src=\"losses.svg\"") && page.contains("<a href=\"losses.png\">"),
            "{page}"
        );
    }
}
