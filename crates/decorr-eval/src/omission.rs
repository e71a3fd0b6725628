//! Omission rate (the paper's section 6.1): the share of generated images in which the VLM says the
//! target object is absent, with a Wilson score interval for it.
//!
//! Per image the VLM is asked "Is there {object} in this image?" ([`crate::captioner`]). A "no" is
//! an omission, a "yes" is not. Replies that start with neither word ([`Answer::Unclear`]) are
//! **left out of the denominator** and counted separately in [`OmissionRate::unclear`]: counting
//! them as omissions (or as hits) would bias the rate in a direction that depends on how chatty
//! the VLM is, not on the images. The report shows the unclear count so a reader can see when
//! that choice matters.

use serde::{Deserialize, Serialize};

use crate::captioner::Answer;

/// The two-sided 95% normal quantile, `Φ⁻¹(0.975)` (scipy's `norm.ppf(0.975)`).
pub const Z_95: f64 = 1.959963984540054;

/// Wilson score interval for a binomial proportion `successes / n` (no continuity correction),
/// as `scipy.stats.binomtest(..).proportion_ci(method="wilson")` computes it; `z` is the normal
/// quantile ([`Z_95`] for a 95% interval).
///
/// Chosen over the normal (Wald) interval because it stays inside [0, 1] and is not degenerate at
/// 0 or n successes, which is common for omission counts on small prompt sets. With `n == 0` there
/// is no information and the interval is the whole `(0, 1)`. `successes` above `n` is clamped to
/// `n`.
pub fn wilson_interval(successes: u64, n: u64, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let s = successes.min(n);
    let nf = n as f64;
    let p = s as f64 / nf;
    let z2 = z * z;
    let denom = 1.0 + z2 / nf;
    let center = (p + z2 / (2.0 * nf)) / denom;
    let half = z * (p * (1.0 - p) / nf + z2 / (4.0 * nf * nf)).sqrt() / denom;
    // Analytically the bounds are exactly 0 / 1 at s = 0 / s = n; pin them so rounding does not
    // produce -1e-17 or 0.9999999999999999.
    let low = if s == 0 {
        0.0
    } else {
        (center - half).max(0.0)
    };
    let high = if s == n {
        1.0
    } else {
        (center + half).min(1.0)
    };
    (low, high)
}

/// Omission rate of one object over a set of images, with its Wilson interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OmissionRate {
    /// Images where the VLM answered "no" (object omitted).
    pub missing: u64,
    /// Images with a clear answer ("yes" or "no"): the denominator.
    pub total: u64,
    /// Images whose answer was neither yes nor no; not in `total`.
    pub unclear: u64,
    /// `missing / total`; NaN when `total` is 0 (no clear answer at all).
    pub rate: f64,
    /// Lower bound of the Wilson interval (0 when `total` is 0).
    pub low: f64,
    /// Upper bound of the Wilson interval (1 when `total` is 0).
    pub high: f64,
}

impl OmissionRate {
    /// From counts, with a 95% interval. `missing` above `total` is clamped to `total`.
    pub fn from_counts(missing: u64, total: u64, unclear: u64) -> Self {
        Self::from_counts_z(missing, total, unclear, Z_95)
    }

    /// From counts, with an interval for the normal quantile `z`.
    pub fn from_counts_z(missing: u64, total: u64, unclear: u64, z: f64) -> Self {
        let missing = missing.min(total);
        let rate = if total == 0 {
            f64::NAN
        } else {
            missing as f64 / total as f64
        };
        let (low, high) = wilson_interval(missing, total, z);
        OmissionRate {
            missing,
            total,
            unclear,
            rate,
            low,
            high,
        }
    }

    /// From the per-image answers to "is there {object}?" for the target object, 95% interval.
    pub fn from_answers(answers: &[Answer]) -> Self {
        Self::from_answers_z(answers, Z_95)
    }

    /// From the per-image answers, with an interval for the normal quantile `z`.
    pub fn from_answers_z(answers: &[Answer], z: f64) -> Self {
        let (mut missing, mut present, mut unclear) = (0u64, 0u64, 0u64);
        for a in answers {
            match a {
                Answer::No => missing += 1,
                Answer::Yes => present += 1,
                Answer::Unclear(_) => unclear += 1,
            }
        }
        Self::from_counts_z(missing, missing + present, unclear, z)
    }
}

impl std::fmt::Display for OmissionRate {
    /// E.g. `30.0% (3/10, 95% CI 10.8–60.3%, 1 unclear)`; the "95%" assumes [`Z_95`].
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.total == 0 {
            write!(f, "n/a (0 clear answers")?;
        } else {
            write!(
                f,
                "{:.1}% ({}/{}, 95% CI {:.1}–{:.1}%",
                100.0 * self.rate,
                self.missing,
                self.total,
                100.0 * self.low,
                100.0 * self.high
            )?;
        }
        if self.unclear > 0 {
            write!(f, ", {} unclear", self.unclear)?;
        }
        write!(f, ")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values from scipy 1.x:
    /// `binomtest(s, n).proportion_ci(confidence_level=0.95, method="wilson")`
    /// (`tests/pyref/wilson_reference.py` prints this table). 81/263, 15/148, 0/20 and 1/29 are
    /// also the worked examples of Newcombe (1998), Stat. Med. 17:857, table I, method 3, which
    /// lists them to 4 decimals: 0.2553–0.3662, 0.0624–0.1605, 0–0.1611, 0.0061–0.1718.
    const SCIPY: &[(u64, u64, f64, f64)] = &[
        (0, 10, 0.0, 0.27753279986288926),
        (5, 10, 0.236593090512564, 0.7634069094874361),
        (10, 10, 0.7224672001371109, 1.0),
        (81, 263, 0.2552885198782742, 0.36620957698280004),
        (15, 148, 0.06238639953073629, 0.16048724172330803),
        (0, 20, 0.0, 0.16112515805281935),
        (1, 29, 0.006113214292762667, 0.17175521879320282),
        (3, 7, 0.1582198552514697, 0.7495416354723428),
    ];

    #[test]
    fn wilson_matches_scipy() {
        let mut max_err = 0.0f64;
        for &(s, n, lo, hi) in SCIPY {
            let (l, h) = wilson_interval(s, n, Z_95);
            max_err = max_err.max((l - lo).abs()).max((h - hi).abs());
            assert!(
                (l - lo).abs() < 1e-12 && (h - hi).abs() < 1e-12,
                "{s}/{n}: got ({l}, {h}), scipy ({lo}, {hi})"
            );
        }
        // Measured: 1.1e-16 (rounding level).
        eprintln!("wilson_interval: max |error| vs scipy = {max_err:e}");
        assert!(max_err < 1e-12);
    }

    #[test]
    fn wilson_edge_cases() {
        assert_eq!(wilson_interval(0, 0, Z_95), (0.0, 1.0));
        // Exact 0 and 1 at the ends, never outside [0, 1].
        assert_eq!(wilson_interval(0, 1, Z_95).0, 0.0);
        assert_eq!(wilson_interval(1, 1, Z_95).1, 1.0);
        // Clamped when successes > n.
        assert_eq!(wilson_interval(12, 10, Z_95), wilson_interval(10, 10, Z_95));
        // Symmetry: the interval of s/n mirrors that of (n-s)/n.
        let (l, h) = wilson_interval(3, 17, Z_95);
        let (l2, h2) = wilson_interval(14, 17, Z_95);
        assert!((l - (1.0 - h2)).abs() < 1e-14 && (h - (1.0 - l2)).abs() < 1e-14);
        // A wider z gives a wider interval.
        let (lw, hw) = wilson_interval(3, 17, 2.575829303548901);
        assert!(lw < l && hw > h);
    }

    #[test]
    fn omission_rate_excludes_unclear() {
        let answers = vec![
            Answer::No,
            Answer::Yes,
            Answer::No,
            Answer::Unclear("maybe".into()),
            Answer::Yes,
            Answer::Yes,
            Answer::Yes,
            Answer::No,
            Answer::Yes,
            Answer::Yes,
            Answer::Yes,
        ];
        let r = OmissionRate::from_answers(&answers);
        assert_eq!((r.missing, r.total, r.unclear), (3, 10, 1));
        assert!((r.rate - 0.3).abs() < 1e-15);
        let (lo, hi) = wilson_interval(3, 10, Z_95);
        assert_eq!((r.low, r.high), (lo, hi));
        assert_eq!(r.to_string(), "30.0% (3/10, 95% CI 10.8–60.3%, 1 unclear)");
    }

    #[test]
    fn omission_rate_without_clear_answers() {
        let r = OmissionRate::from_answers(&[Answer::Unclear(String::new())]);
        assert_eq!((r.missing, r.total, r.unclear), (0, 0, 1));
        assert!(r.rate.is_nan());
        assert_eq!((r.low, r.high), (0.0, 1.0));
        assert_eq!(r.to_string(), "n/a (0 clear answers, 1 unclear)");
        let r = OmissionRate::from_counts(7, 5, 0);
        assert_eq!((r.missing, r.total, r.rate), (5, 5, 1.0));
    }
}
