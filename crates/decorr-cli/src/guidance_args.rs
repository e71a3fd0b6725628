//! The sampling-side methods' flags, shared by `generate`, `fix` and `compare`: PAG's scales and
//! layers, Attend-and-Excite's objects and schedule (BASELINES.md). Parsing only: the values are
//! checked against the UNet by `StableDiffusion::check`, which names what exists.

use std::collections::BTreeMap;

use anyhow::Result;
use clap::Args;
use decorr_pipeline::{ExciteParams, PagParams};

/// PAG and Attend-and-Excite settings (used only by `--guidance pag` / `attend-and-excite`).
#[derive(Args, Debug, Clone)]
pub struct GuidanceArgs {
    /// PAG: the perturbed-attention scale s (0 turns PAG off; a finite number >= 0).
    #[arg(long, default_value_t = 3.0, value_parser = crate::flags::non_negative,
          help_heading = "Perturbed-attention guidance (PAG)")]
    pub pag_scale: f64,
    /// PAG: the adaptive scale a; s_t = max(0, s - a (1000 - t)) (0: constant s).
    #[arg(long, default_value_t = 0.0, value_parser = crate::flags::non_negative,
          help_heading = "Perturbed-attention guidance (PAG)")]
    pub pag_adaptive_scale: f64,
    /// PAG: the self-attention layers perturbed, comma-separated: diffusers' `pag_applied_layers`
    /// (regular expressions over module paths: mid, down_blocks.1, up_blocks.0.attentions.1).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "mid",
        help_heading = "Perturbed-attention guidance (PAG)"
    )]
    pub pag_layers: Vec<String>,
    /// Attend-and-Excite: the objects to excite, as words of the prompt (a word maps to its last
    /// BPE token; `word#N` for a repeated word, `@index` for a raw token index).
    #[arg(
        long,
        value_delimiter = ',',
        conflicts_with = "excite_indices",
        help_heading = "Attend-and-Excite"
    )]
    pub excite: Vec<String>,
    /// Attend-and-Excite: the objects as token indices (diffusers' `token_indices`; BOS is 0).
    #[arg(long, value_delimiter = ',', help_heading = "Attend-and-Excite")]
    pub excite_indices: Vec<usize>,
    /// Attend-and-Excite: steps (positions in the scheduler's timesteps) 0..N get the latent
    /// update.
    #[arg(long, default_value_t = 25,
          value_parser = crate::flags::usize_in(0, crate::flags::MAX_STEPS + 1),
          help_heading = "Attend-and-Excite")]
    pub excite_max_iter_to_alter: usize,
    /// Attend-and-Excite: iterative refinement at these positions while the loss exceeds
    /// 1 - threshold, as POS:VALUE,... (empty: none).
    #[arg(long, default_value = "0:0.05,10:0.5,20:0.8", value_parser = parse_thresholds,
          help_heading = "Attend-and-Excite")]
    pub excite_thresholds: Thresholds,
    /// Attend-and-Excite: the step size's scale (alpha_i = factor * sqrt(linspace(1, 0.5)[i])).
    #[arg(long, default_value_t = 20.0, value_parser = crate::flags::non_negative,
          help_heading = "Attend-and-Excite")]
    pub excite_scale_factor: f64,
    /// Attend-and-Excite: the cross-attention resolution whose maps make the loss, `16` or
    /// `HxW` (16 for 512 px SD 1.5).
    #[arg(long, default_value = "16", value_parser = parse_attn_res,
          help_heading = "Attend-and-Excite")]
    pub excite_attn_res: [usize; 2],
    /// Attend-and-Excite: most refinement updates at one threshold position.
    #[arg(long, default_value_t = 20,
          value_parser = crate::flags::usize_in(0, 100_000),
          help_heading = "Attend-and-Excite")]
    pub excite_max_refinement_steps: usize,
}

/// `--excite-thresholds`: position -> threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds(pub BTreeMap<usize, f64>);

/// `0:0.05,10:0.5,20:0.8` (an empty string: no refinement anywhere).
pub fn parse_thresholds(s: &str) -> Result<Thresholds, String> {
    let mut map = BTreeMap::new();
    let expected = "expected POS:VALUE,... with POS a step position (0, 1, ...) and VALUE a \
                    finite number, e.g. 0:0.05,10:0.5,20:0.8";
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (pos, value) = part
            .split_once(':')
            .ok_or_else(|| format!("`{part}` has no `:`; {expected}"))?;
        let pos: usize = pos
            .trim()
            .parse()
            .map_err(|_| format!("`{part}`: `{pos}` is not a position; {expected}"))?;
        let value: f64 = value
            .trim()
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite())
            .ok_or_else(|| format!("`{part}`: `{value}` is not a finite number; {expected}"))?;
        if map.insert(pos, value).is_some() {
            return Err(format!("position {pos} is given twice; {expected}"));
        }
    }
    Ok(Thresholds(map))
}

/// `16` (square) or `16x24` (height x width).
pub fn parse_attn_res(s: &str) -> Result<[usize; 2], String> {
    let bad = || format!("`{s}` is not a resolution: write 16 (square) or HxW such as 16x24");
    let side = |v: &str| v.trim().parse::<usize>().ok().filter(|&v| v > 0);
    match s.split_once(['x', 'X']) {
        Some((h, w)) => Ok([side(h).ok_or_else(bad)?, side(w).ok_or_else(bad)?]),
        None => {
            let v = side(s).ok_or_else(bad)?;
            Ok([v, v])
        }
    }
}

impl GuidanceArgs {
    /// PAG's settings.
    pub fn pag(&self) -> PagParams {
        PagParams {
            scale: self.pag_scale,
            adaptive_scale: self.pag_adaptive_scale,
            layers: self
                .pag_layers
                .iter()
                .map(|l| l.trim().to_string())
                .collect(),
        }
    }

    /// Whether the objects to excite were given (`--excite` or `--excite-indices`).
    pub fn has_objects(&self) -> bool {
        !self.excite.is_empty() || !self.excite_indices.is_empty()
    }

    /// Attend-and-Excite's settings with `--excite-indices` as its objects (empty when the
    /// objects are `--excite` words, which the run resolves in each prompt).
    pub fn excite_params(&self) -> ExciteParams {
        ExciteParams {
            token_indices: self.excite_indices.clone(),
            ..self.excite_settings()
        }
    }

    /// Attend-and-Excite's settings without the objects.
    pub fn excite_settings(&self) -> ExciteParams {
        ExciteParams {
            token_indices: Vec::new(),
            max_iter_to_alter: self.excite_max_iter_to_alter,
            thresholds: self.excite_thresholds.0.clone(),
            scale_factor: self.excite_scale_factor,
            attn_res: self.excite_attn_res,
            max_refinement_steps: self.excite_max_refinement_steps,
            ..ExciteParams::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_parse_or_name_the_format() {
        let t = parse_thresholds("0:0.05, 10:0.5,20:0.8").unwrap();
        assert_eq!(t.0, BTreeMap::from([(0, 0.05), (10, 0.5), (20, 0.8)]));
        assert!(parse_thresholds("").unwrap().0.is_empty());
        for bad in ["0", "a:0.5", "0:x", "0:nan", "-1:0.5", "0:0.1,0:0.2"] {
            let e = parse_thresholds(bad).unwrap_err();
            assert!(e.contains("POS:VALUE"), "{bad}: {e}");
        }
    }

    #[test]
    fn attn_res_is_square_or_h_by_w() {
        assert_eq!(parse_attn_res("16").unwrap(), [16, 16]);
        assert_eq!(parse_attn_res("16x24").unwrap(), [16, 24]);
        for bad in ["0", "x", "16x", "a", "16x0"] {
            assert!(parse_attn_res(bad).unwrap_err().contains("HxW"), "{bad}");
        }
    }
}
