//! The methods decorr runs and compares, each named once. [`MethodKind`] is what a flag names
//! and what a folder, a manifest record, a grid row and a report row are called; [`Method`] is
//! a kind with its settings, resolved for one request, and turns into the pipeline's request
//! (its guidance and its text side) and, for DisenDiff, into the pipeline variant that carries
//! the trained weights. Older decorr named some methods differently on disk
//! ([`MethodKind::old_names`]); those names are still read.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use decorr_pipeline::{
    ExciteParams, GenerateParams, Guidance, PagParams, StableDiffusion, TextSide, TunedEncoder,
};
use serde::{Deserialize, Serialize};

use crate::error::{Result, RunsError};

/// One of the five methods the paper compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MethodKind {
    /// The pre-trained model with classifier-free guidance.
    Sd,
    /// Perturbed-attention guidance.
    Pag,
    /// Attend-and-Excite on two objects of the prompt.
    Aae,
    /// The fine-tuned encoder with the decorrelated guidance (docs/method.md).
    Ours,
    /// DisenDiff: trained per pair, then sampled with CFG and the modifiers in the prompt.
    Disendiff,
}

impl MethodKind {
    /// Every method, in the rows' order.
    pub const ALL: [MethodKind; 5] = [
        MethodKind::Sd,
        MethodKind::Pag,
        MethodKind::Aae,
        MethodKind::Disendiff,
        MethodKind::Ours,
    ];

    /// Whether the method trains per prompt (its images of a prompt stay on one shard).
    pub fn trains(self) -> bool {
        matches!(self, MethodKind::Ours | MethodKind::Disendiff)
    }

    /// The one name of the method: its folder, its manifests' `method`, its row in grids,
    /// pages and reports, and what `--methods`/`--compare` take.
    pub fn name(self) -> &'static str {
        match self {
            MethodKind::Sd => "sd",
            MethodKind::Pag => "pag",
            MethodKind::Aae => "aae",
            MethodKind::Ours => "ours",
            MethodKind::Disendiff => "disendiff",
        }
    }

    /// What older decorr called the method's folder or manifest record (`fix` wrote
    /// `pretrained/` and `fixed/`; manifests said `decorrelated`): read, never written.
    pub fn old_names(self) -> &'static [&'static str] {
        match self {
            MethodKind::Sd => &["pretrained"],
            MethodKind::Ours => &["fixed", "decorrelated"],
            _ => &[],
        }
    }

    /// The grid's row label.
    pub fn label(self) -> &'static str {
        match self {
            MethodKind::Sd => "pre-trained (CFG)",
            MethodKind::Pag => "PAG",
            MethodKind::Aae => "Attend-and-Excite",
            MethodKind::Ours => "decorrelated (ours)",
            MethodKind::Disendiff => "DisenDiff",
        }
    }

    /// The method's folder under `out`: its name, or an old name when only that exists (an
    /// older run being resumed).
    pub fn dir(self, out: &Path) -> PathBuf {
        let new = out.join(self.name());
        if new.exists() {
            return new;
        }
        self.old_names()
            .iter()
            .map(|old| out.join(old))
            .find(|p| p.is_dir())
            .unwrap_or(new)
    }
}

impl std::fmt::Display for MethodKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MethodKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        if s == "attend-and-excite" {
            return Ok(MethodKind::Aae);
        }
        MethodKind::ALL
            .into_iter()
            .find(|m| m.name() == s || m.old_names().contains(&s))
            .ok_or_else(|| {
                format!(
                    "unknown method `{s}`; the methods are sd, pag, aae (attend-and-excite), \
                     disendiff and ours (decorrelated)"
                )
            })
    }
}

/// The name a manifest's `method` had when older decorr wrote it, as it is called now
/// (`decorrelated` is `ours`, `decorrelated+pag` is `ours+pag`); other names are kept.
pub fn current_name(recorded: &str) -> String {
    match recorded.split_once('+') {
        Some(("decorrelated", rest)) => format!("ours+{rest}"),
        _ if recorded == "decorrelated" => "ours".into(),
        _ => recorded.into(),
    }
}

/// A method with its settings, resolved for one request: the methods' parameters are their
/// payload, so a request cannot carry settings its method does not use.
#[derive(Debug, Clone)]
pub enum Method {
    /// The pre-trained model with classifier-free guidance.
    Sd,
    Pag(PagParams),
    AttendAndExcite(ExciteParams),
    /// The decorrelated guidance: the conditional embedding from `encoder`, the unconditional
    /// one from the pre-trained encoder; `guidance` is CFG, or (`decorr generate` only) PAG or
    /// Attend-and-Excite on top.
    Decorrelated {
        encoder: TunedEncoder,
        guidance: Guidance,
    },
    /// The fine-tuned encoder for both branches under CFG (an ablation, `decorr generate`).
    FinetunedCfg {
        encoder: TunedEncoder,
    },
    /// DisenDiff's trained weights and modifier tokens, sampled with CFG.
    DisenDiff {
        delta: Arc<decorr_disendiff::DeltaFiles>,
    },
}

impl Method {
    /// Which of the compared methods this is (`None`: generate's ablation).
    pub fn kind(&self) -> Option<MethodKind> {
        Some(match self {
            Method::Sd => MethodKind::Sd,
            Method::Pag(_) => MethodKind::Pag,
            Method::AttendAndExcite(_) => MethodKind::Aae,
            Method::Decorrelated { .. } => MethodKind::Ours,
            Method::DisenDiff { .. } => MethodKind::Disendiff,
            Method::FinetunedCfg { .. } => return None,
        })
    }

    /// The name its manifests record: the kind's name, `finetuned-cfg`, or `ours+pag` /
    /// `ours+aae` for the decorrelated text side under another guidance.
    pub fn name(&self) -> &'static str {
        match self {
            Method::FinetunedCfg { .. } => "finetuned-cfg",
            Method::Decorrelated { guidance, .. } => match guidance {
                Guidance::Cfg => "ours",
                Guidance::Pag(_) => "ours+pag",
                Guidance::AttendAndExcite(_) => "ours+aae",
            },
            m => m.kind().expect("a compared method").name(),
        }
    }

    /// The sampling-side guidance of the request.
    pub fn guidance(&self) -> Guidance {
        match self {
            Method::Pag(p) => Guidance::Pag(p.clone()),
            Method::AttendAndExcite(e) => Guidance::AttendAndExcite(e.clone()),
            Method::Decorrelated { guidance, .. } => guidance.clone(),
            Method::Sd | Method::FinetunedCfg { .. } | Method::DisenDiff { .. } => Guidance::Cfg,
        }
    }

    /// Which encoder encodes which branch.
    pub fn text(&self) -> TextSide {
        match self {
            Method::Decorrelated { encoder, .. } => TextSide::Decorrelated(encoder.clone()),
            Method::FinetunedCfg { encoder } => TextSide::Tuned(encoder.clone()),
            _ => TextSide::Pretrained,
        }
    }

    /// Sets `params`' guidance and text side to this method's.
    pub fn apply(&self, params: &mut GenerateParams) {
        params.guidance = self.guidance();
        params.text = self.text();
    }

    /// The pipeline this method samples with: `sd` itself, or for DisenDiff a variant of it
    /// with the delta's weights and modifier tokens (`sd` is not changed; the variant shares
    /// every other weight with it).
    pub fn pipeline<'a>(
        &self,
        sd: &'a StableDiffusion,
    ) -> Result<std::borrow::Cow<'a, StableDiffusion>> {
        match self {
            Method::DisenDiff { delta } => Ok(std::borrow::Cow::Owned(
                decorr_disendiff::with_delta(sd, delta)
                    .map_err(|e| RunsError::Msg(format!("DisenDiff: {e}")))?,
            )),
            _ => Ok(std::borrow::Cow::Borrowed(sd)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_name_per_method_and_the_old_ones_read() {
        let names: Vec<&str> = MethodKind::ALL.iter().map(|m| m.name()).collect();
        assert_eq!(names, ["sd", "pag", "aae", "disendiff", "ours"]);
        for m in MethodKind::ALL {
            assert_eq!(m.name().parse::<MethodKind>().unwrap(), m);
            for old in m.old_names() {
                assert_eq!(old.parse::<MethodKind>().unwrap(), m);
            }
        }
        assert_eq!(
            "decorrelated".parse::<MethodKind>().unwrap(),
            MethodKind::Ours
        );
        assert_eq!(
            "attend-and-excite".parse::<MethodKind>().unwrap(),
            MethodKind::Aae
        );
        assert!("cfg".parse::<MethodKind>().unwrap_err().contains("sd, pag"));
        assert_eq!(current_name("decorrelated"), "ours");
        assert_eq!(current_name("decorrelated+pag"), "ours+pag");
        assert_eq!(current_name("finetuned-cfg"), "finetuned-cfg");
        assert_eq!(current_name("sd"), "sd");
    }

    #[test]
    fn an_old_folder_is_found_until_a_new_one_exists() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(MethodKind::Ours.dir(d.path()), d.path().join("ours"));
        std::fs::create_dir(d.path().join("fixed")).unwrap();
        assert_eq!(MethodKind::Ours.dir(d.path()), d.path().join("fixed"));
        assert_eq!(MethodKind::Sd.dir(d.path()), d.path().join("sd"));
        std::fs::create_dir(d.path().join("ours")).unwrap();
        assert_eq!(MethodKind::Ours.dir(d.path()), d.path().join("ours"));
    }

    #[test]
    fn settings_travel_as_the_payload() {
        let pag = PagParams::default();
        let m = Method::Pag(pag.clone());
        assert_eq!(m.kind(), Some(MethodKind::Pag));
        assert_eq!(m.guidance(), Guidance::Pag(pag));
        assert!(matches!(m.text(), TextSide::Pretrained));
        assert_eq!(Method::Sd.guidance(), Guidance::Cfg);
        assert_eq!(Method::Sd.name(), "sd");
    }
}
