//! The human study of the paper's table 4 (raters score each method's image for alignment and
//! fidelity on 5-point scales): [`create`] picks the comparisons from `decorr generate`'s
//! manifests and writes `STUDY/study.sqlite` ([`db`]) and metadata-free copies of the images;
//! [`server`] serves the blind rating pages and their JSON API (axum); [`report`] computes table 4
//! and the statistics the paper lacks. The statistics, as pure functions on `f64`, each matching the
//! reference implementation a reader would check it against (tests/pyref/make_study_stats_fixtures.py
//! writes the fixture, tests/stats_parity.rs compares within 1e-9):
//! - [`mean_std`]: mean and sample standard deviation (numpy `std(ddof=1)`);
//! - [`krippendorff_alpha_ordinal`], [`krippendorff_alpha_interval`]: inter-rater agreement (the
//!   `krippendorff` package);
//! - [`wilcoxon_signed_rank`]: paired two-sided signed-rank test of a method against the
//!   pre-trained model (`scipy.stats.wilcoxon` with its defaults);
//! - [`bootstrap_mean_ci`]: percentile bootstrap interval of a mean, split into
//!   [`bootstrap_means_from_indices`] and [`percentile_interval`] / [`percentile`] (numpy's
//!   default linear percentile) so that each half is checked against numpy exactly; the resampling
//!   draws from [`Xoshiro256StarStar`], a small seeded generator of our own.
//!
//! Functions return `None` where a statistic is undefined for the data (no pairs, no variation)
//! and [`StudyError`] for arguments that cannot be right (an index past the data, a confidence
//! outside (0, 1)).

pub mod create;
pub mod db;
pub mod report;
pub mod server;
pub mod stats;

pub use stats::{
    Wilcoxon, WilcoxonMethod, Xoshiro256StarStar, bootstrap_mean_ci, bootstrap_means_from_indices,
    krippendorff_alpha_interval, krippendorff_alpha_ordinal, mean_std, percentile,
    percentile_interval, wilcoxon_signed_rank, wilcoxon_signed_rank_with,
};

/// What can go wrong in a study: invalid statistics arguments, and the study's files, database
/// and runs (a message naming the problem and the fix).
#[derive(Debug, thiserror::Error)]
pub enum StudyError {
    #[error("no values: a percentile or a bootstrap needs at least one")]
    Empty,
    #[error("resample {resample} is empty: a resample needs at least one index")]
    EmptyResample { resample: usize },
    #[error("resample {resample} draws index {index}, but there are only {len} values")]
    IndexOutOfRange {
        resample: usize,
        index: usize,
        len: usize,
    },
    #[error("percentile {0} is outside 0..=100")]
    InvalidPercentile(f64),
    #[error("confidence {0} is outside the open interval (0, 1)")]
    InvalidConfidence(f64),
    #[error("a bootstrap needs at least one resample")]
    NoResamples,
    #[error(
        "{resamples} bootstrap resamples is more than {max}, the most a bootstrap takes (each \
         resample's mean is held in memory); 10000 is usual"
    )]
    TooManyResamples { resamples: usize, max: usize },
    /// A user-facing problem: what is wrong and how to fix it.
    #[error("{0}")]
    Msg(String),
    #[error("the study database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Runs(#[from] decorr_runs::RunsError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// Most bootstrap resamples: 8 MB of means, a hundred times the usual 10000 (a bound, so that a
/// mistyped count is an error, not an abort on allocation).
pub const MAX_RESAMPLES: usize = 1_000_000;

/// One CSV cell: a text that a spreadsheet would run as a formula (starting with `=`, `+`, `-`,
/// `@`, a tab or a carriage return: a rater's name or a prompt is anyone's text) gets a leading
/// `'`, as OWASP advises, and a cell holding a separator, a quote or a line break is quoted.
pub fn csv_cell(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// `Err(StudyError::Msg(format!(...)))`.
macro_rules! bail {
    ($($t:tt)*) => {
        return Err($crate::StudyError::Msg(format!($($t)*)))
    };
}
pub(crate) use bail;

#[cfg(test)]
mod tests {
    use super::csv_cell;

    #[test]
    fn csv_cells_that_a_spreadsheet_would_run_are_neutralised() {
        for (text, cell) in [
            (
                "=HYPERLINK(\"http://x\",\"y\")",
                "\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\"",
            ),
            ("+1", "'+1"),
            ("-2+3", "'-2+3"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\t=1", "'\t=1"),
            ("\r=1", "\"'\r=1\""),
            ("a cat, a hat", "\"a cat, a hat\""),
            ("say \"hi\"", "\"say \"\"hi\"\"\""),
            ("a = b", "a = b"),
            ("rater-01", "rater-01"),
            ("", ""),
        ] {
            assert_eq!(csv_cell(text), cell, "{text:?}");
        }
    }
}
