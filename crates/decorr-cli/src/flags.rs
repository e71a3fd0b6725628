//! Value parsers for numeric flags, so that a bad number is refused by the argument parser
//! itself, before anything is loaded or created on disk, with an error that names the flag
//! (clap adds it: "invalid value '-1' for '--lr <LR>': ...") and the allowed range.

use clap::builder::RangedU64ValueParser;

/// Most epochs `finetune`/`fix` accept.
pub const MAX_EPOCHS: u64 = 100_000;
/// Most optimiser steps per epoch.
pub const MAX_STEPS_PER_EPOCH: u64 = 100_000;
/// Most denoising steps (the schedulers' training schedules have 1000 timesteps).
pub const MAX_STEPS: u64 = 1000;
/// Largest image side in pixels (the pipeline's own bound).
pub const MAX_SIDE: u64 = decorr_pipeline::pipeline::MAX_SIDE as u64;
/// Most images one `generate`/`fix` run makes per prompt.
pub const MAX_IMAGES: u64 = 1_000_000;
/// Most images in one batch (of a model call or an evaluation pass).
pub const MAX_BATCH: u64 = 4096;
/// Largest guidance scale (the pipeline's own bound).
pub const MAX_GUIDANCE_SCALE: f64 = decorr_pipeline::pipeline::MAX_GUIDANCE_SCALE;

/// An output folder, with symbolic links followed: a run writes into the folder a link names
/// (replacing it on `--overwrite` there), never replacing the link by a folder of its own.
pub fn out_folder(s: &str) -> Result<std::path::PathBuf, String> {
    if s.is_empty() {
        return Err("an empty path; name the output folder".into());
    }
    Ok(decorr_core::io::resolve_links(std::path::Path::new(s)))
}

/// A `usize` in `min..=max`.
pub fn usize_in(min: u64, max: u64) -> RangedU64ValueParser<usize> {
    RangedU64ValueParser::<usize>::new().range(min..=max)
}

fn number(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))?;
    if !v.is_finite() {
        return Err(format!("{s} is not a finite number"));
    }
    Ok(v)
}

/// Seconds, from 1 to a day (a timeout).
pub fn seconds(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if !(1.0..=86_400.0).contains(&v) {
        return Err(format!("{s} is not in 1..=86400 (seconds, up to a day)"));
    }
    Ok(v)
}

/// A finite number > 0 (learning rates).
pub fn positive(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if v <= 0.0 {
        return Err(format!(
            "{v} is not > 0; give a finite number > 0 (e.g. 1e-5)"
        ));
    }
    Ok(v)
}

/// A finite number >= 0 (tau).
pub fn non_negative(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if v < 0.0 {
        return Err(format!("{v} is negative; give a finite number >= 0"));
    }
    Ok(v)
}

/// A finite number >= 0 as f32 (weight decay), finite in f32 too.
pub fn non_negative_f32(s: &str) -> Result<f32, String> {
    let v = non_negative(s)?;
    let f = v as f32;
    if !f.is_finite() {
        return Err(format!("{v} is too large; give a finite number >= 0"));
    }
    Ok(f)
}

/// A number in [0, 1] (DDIM's eta).
pub fn unit_interval(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{v} is not in [0, 1]"));
    }
    Ok(v)
}

/// The guidance scale: a number in [0, MAX_GUIDANCE_SCALE].
pub fn guidance_scale(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if !(0.0..=MAX_GUIDANCE_SCALE).contains(&v) {
        return Err(format!(
            "{v} is not in [0, {MAX_GUIDANCE_SCALE}] (1 or less turns guidance off; 7.5 is usual)"
        ));
    }
    Ok(v)
}

/// The seeds of `--seed S --num-images N`: S, S+1, ..., S+N-1, refusing a run past u64::MAX
/// (which would otherwise wrap around to seed 0).
pub fn seed_range(seed: u64, num_images: usize) -> anyhow::Result<Vec<u64>> {
    let n = num_images as u64;
    if n == 0 {
        anyhow::bail!("--num-images must be at least 1");
    }
    if seed.checked_add(n - 1).is_none() {
        anyhow::bail!(
            "--seed {seed} with --num-images {num_images} runs past the largest seed {} \
             (image k uses seed --seed + k); lower --seed to at most {}",
            u64::MAX,
            u64::MAX - (n - 1)
        );
    }
    Ok((0..n).map(|k| seed + k).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_checked() {
        assert_eq!(positive("1e-5").unwrap(), 1e-5);
        for bad in ["0", "-1", "nan", "NaN", "inf", "-inf", "x", ""] {
            assert!(positive(bad).is_err(), "{bad}");
        }
        assert_eq!(non_negative("0").unwrap(), 0.0);
        assert!(non_negative("-5").unwrap_err().contains("negative"));
        assert!(non_negative("nan").unwrap_err().contains("finite"));
        assert!(non_negative_f32("1e300").is_err());
        assert_eq!(non_negative_f32("0.01").unwrap(), 0.01);
        assert!(unit_interval("1.5").is_err() && unit_interval("-0.1").is_err());
        assert_eq!(unit_interval("0.7").unwrap(), 0.7);
        assert!(guidance_scale("1e39").is_err() && guidance_scale("-1").is_err());
        assert_eq!(guidance_scale("7.5").unwrap(), 7.5);
    }

    #[test]
    fn seeds_do_not_wrap() {
        assert_eq!(seed_range(5, 3).unwrap(), vec![5, 6, 7]);
        assert_eq!(seed_range(u64::MAX, 1).unwrap(), vec![u64::MAX]);
        let e = seed_range(u64::MAX, 2).unwrap_err().to_string();
        assert!(e.contains("--seed") && e.contains("--num-images"), "{e}");
        assert_eq!(
            seed_range(u64::MAX - 1, 2).unwrap(),
            vec![u64::MAX - 1, u64::MAX]
        );
    }
}
