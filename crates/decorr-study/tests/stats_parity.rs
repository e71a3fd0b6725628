//! `decorr_study::stats` against numpy, scipy and krippendorff on the fixture that
//! tests/pyref/make_study_stats_fixtures.py writes (tests/fixtures/study/stats.json): every case
//! within 1e-9 (absolute, or relative where the value is large), every Wilcoxon p value for each
//! method scipy can be forced to as well as the one `auto` picks, and the edge cases where a
//! statistic is undefined.

use std::path::PathBuf;

use decorr_study::*;
use serde::Deserialize;

const TOL: f64 = 1e-9;

#[derive(Deserialize)]
struct Fixture {
    versions: Versions,
    mean_std: Vec<MeanStdCase>,
    krippendorff: Vec<AlphaCase>,
    wilcoxon: Vec<WilcoxonCase>,
    bootstrap: Vec<BootstrapCase>,
    percentile: Vec<PercentileCase>,
}

#[derive(Deserialize)]
struct Versions {
    numpy: String,
    scipy: String,
    krippendorff: String,
}

#[derive(Deserialize)]
struct MeanStdCase {
    xs: Vec<f64>,
    mean: f64,
    std: Option<f64>,
}

#[derive(Deserialize)]
struct AlphaCase {
    name: String,
    data: Vec<Vec<Option<f64>>>,
    ordinal: Option<f64>,
    interval: Option<f64>,
}

#[derive(Deserialize)]
struct Forced {
    exact: f64,
    asymptotic: f64,
    permutation: Option<f64>,
}

#[derive(Deserialize)]
struct WilcoxonCase {
    name: String,
    x: Vec<f64>,
    y: Vec<f64>,
    statistic: f64,
    p_value: f64,
    n_nonzero: usize,
    p_forced: Forced,
    auto_method: WilcoxonMethod,
}

#[derive(Deserialize)]
struct BootstrapCase {
    xs: Vec<f64>,
    indices: Vec<Vec<usize>>,
    means: Vec<f64>,
    lo: f64,
    hi: f64,
}

#[derive(Deserialize)]
struct PercentileCase {
    values: Vec<f64>,
    q: Vec<f64>,
    expected: Vec<f64>,
}

fn fixture() -> Fixture {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/study/stats.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run tests/pyref/make_study_stats_fixtures.py)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Within 1e-9 absolutely, or relatively for values above 1 (sums of ranks, offsets of 1e6).
fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= TOL * want.abs().max(1.0)
}

#[track_caller]
fn assert_close(got: f64, want: f64, what: &str) {
    assert!(
        close(got, want),
        "{what}: got {got:e}, reference {want:e}, diff {:e}",
        got - want
    );
}

#[test]
fn fixture_records_the_reference_versions() {
    let v = fixture().versions;
    assert_eq!(
        (v.numpy.as_str(), v.scipy.as_str(), v.krippendorff.as_str()),
        ("2.4.6", "1.17.1", "0.9.0"),
        "the fixture was regenerated with other versions: check the documented behaviour still holds"
    );
}

#[test]
fn mean_std_matches_numpy() {
    let cases = fixture().mean_std;
    assert!(cases.len() >= 8);
    for case in cases {
        let (mean, std) = mean_std(&case.xs);
        assert_close(mean, case.mean, &format!("mean of {:?}", case.xs));
        match case.std {
            Some(want) => assert_close(std, want, &format!("std of {:?}", case.xs)),
            None => assert!(std.is_nan(), "std of one value must be NaN, got {std}"),
        }
    }
}

#[test]
fn krippendorff_matches_the_package() {
    let cases = fixture().krippendorff;
    let (mut defined, mut undefined) = (0, 0);
    for case in &cases {
        for (level, got, want) in [
            (
                "ordinal",
                krippendorff_alpha_ordinal(&case.data),
                case.ordinal,
            ),
            (
                "interval",
                krippendorff_alpha_interval(&case.data),
                case.interval,
            ),
        ] {
            match (got, want) {
                (Some(g), Some(w)) => {
                    assert_close(g, w, &format!("{} {level}", case.name));
                    defined += 1;
                }
                (None, None) => undefined += 1,
                _ => panic!("{} {level}: got {got:?}, krippendorff {want:?}", case.name),
            }
        }
    }
    assert!(
        defined >= 20 && undefined >= 8,
        "{defined} defined, {undefined} undefined"
    );
    // The ordinal and interval levels must differ where the values are not equally spaced in
    // their pairable counts, else a test passing both could be checking one formula twice.
    let docstring = cases
        .iter()
        .find(|c| c.name == "docstring_b")
        .expect("docstring_b");
    assert!((docstring.ordinal.unwrap_or(0.0) - docstring.interval.unwrap_or(0.0)).abs() > 1e-3);
}

#[test]
fn krippendorff_docstring_values() {
    // Printed (rounded) in the package's docstring, from Krippendorff's own worked examples.
    let nan = None;
    let s = |v: f64| Some(v);
    let data = vec![
        vec![
            s(1.),
            s(2.),
            s(3.),
            s(3.),
            s(2.),
            s(1.),
            s(4.),
            s(1.),
            s(2.),
            nan,
            nan,
            nan,
        ],
        vec![
            s(1.),
            s(2.),
            s(3.),
            s(3.),
            s(2.),
            s(2.),
            s(4.),
            s(1.),
            s(2.),
            s(5.),
            nan,
            s(3.),
        ],
        vec![
            nan,
            s(3.),
            s(3.),
            s(3.),
            s(2.),
            s(3.),
            s(4.),
            s(2.),
            s(2.),
            s(5.),
            s(1.),
            nan,
        ],
        vec![
            s(1.),
            s(2.),
            s(3.),
            s(3.),
            s(2.),
            s(4.),
            s(4.),
            s(1.),
            s(2.),
            s(5.),
            s(1.),
            nan,
        ],
    ];
    let alpha = krippendorff_alpha_ordinal(&data).expect("defined");
    assert!((alpha - 0.815).abs() < 5e-4, "{alpha}");
}

#[test]
fn wilcoxon_matches_scipy() {
    let cases = fixture().wilcoxon;
    let mut seen = std::collections::BTreeSet::new();
    for case in &cases {
        let name = &case.name;
        let res = wilcoxon_signed_rank(&case.x, &case.y).unwrap_or_else(|| panic!("{name}: None"));
        assert_close(res.statistic, case.statistic, &format!("{name} statistic"));
        assert_close(res.p_value, case.p_value, &format!("{name} p"));
        assert_eq!(res.n, case.n_nonzero, "{name} n");
        assert_eq!(res.zeros, case.x.len() - case.n_nonzero, "{name} zeros");
        assert_eq!(
            res.method, case.auto_method,
            "{name}: scipy's auto picks {:?}",
            case.auto_method
        );
        seen.insert(format!("{:?}", res.method));

        let forced = |method| {
            wilcoxon_signed_rank_with(&case.x, &case.y, method)
                .unwrap_or_else(|| panic!("{name} {method:?}: None"))
        };
        let exact = forced(WilcoxonMethod::Exact);
        assert_eq!(exact.method, WilcoxonMethod::Exact);
        assert_close(
            exact.p_value,
            case.p_forced.exact,
            &format!("{name} forced exact"),
        );
        let asymptotic = forced(WilcoxonMethod::Asymptotic);
        assert_close(
            asymptotic.p_value,
            case.p_forced.asymptotic,
            &format!("{name} forced asymptotic"),
        );
        if let Some(want) = case.p_forced.permutation {
            let permutation = forced(WilcoxonMethod::Permutation);
            assert_close(
                permutation.p_value,
                want,
                &format!("{name} forced permutation"),
            );
        }
        assert_eq!(exact.statistic, res.statistic);
        assert_eq!(asymptotic.statistic, res.statistic);
    }
    assert_eq!(
        seen.len(),
        3,
        "every method of the auto rule is exercised: {seen:?}"
    );
}

/// The choice of method is visible: in these cases taking another method than scipy's would
/// move the p value by far more than the tolerance, so a wrong rule fails the parity test.
#[test]
fn wilcoxon_method_choice_matters() {
    let cases = fixture().wilcoxon;
    let by_name = |n: &str| {
        cases
            .iter()
            .find(|c| c.name == n)
            .unwrap_or_else(|| panic!("no case {n}"))
    };
    for name in [
        "exact_n50",
        "exact_n20",
        "asymptotic_n51_no_ties",
        "asymptotic_n14_no_ties_two_zeros",
    ] {
        let c = by_name(name);
        assert!(
            (c.p_forced.exact - c.p_forced.asymptotic).abs() > 1e-4,
            "{name}"
        );
    }
    // Ties at len(d) <= 13: the permutation distribution, neither exact nor normal.
    let c = by_name("permutation_n13_zero");
    let perm = c.p_forced.permutation.expect("permutation p");
    assert!((perm - c.p_forced.exact).abs() > 1e-3 && (perm - c.p_forced.asymptotic).abs() > 1e-3);
    let c = by_name("permutation_n8_ties");
    let perm = c.p_forced.permutation.expect("permutation p");
    assert!((perm - c.p_forced.exact).abs() > 1e-3 && (perm - c.p_forced.asymptotic).abs() > 1e-3);
}

#[test]
fn wilcoxon_undefined_cases() {
    // All differences zero: nothing to rank (scipy: statistic 0, p 1 for n <= 13, NaN beyond).
    assert_eq!(
        wilcoxon_signed_rank(&[3.0, 4.0, 5.0], &[3.0, 4.0, 5.0]),
        None
    );
    assert_eq!(wilcoxon_signed_rank(&[2.0; 20], &[2.0; 20]), None);
    assert_eq!(wilcoxon_signed_rank(&[], &[]), None);
    assert_eq!(wilcoxon_signed_rank(&[1.0, 2.0], &[1.0]), None);
    assert_eq!(wilcoxon_signed_rank(&[1.0, f64::NAN], &[2.0, 3.0]), None);
    assert_eq!(
        wilcoxon_signed_rank(&[1.0, f64::INFINITY], &[2.0, 3.0]),
        None
    );
    // Swapping x and y swaps R+ and R-: same statistic, same two-sided p.
    let (x, y) = (
        [4.0, 5.0, 3.0, 4.0, 5.0, 2.0, 4.0, 5.0],
        [3.0, 3.0, 1.0, 2.0, 4.0, 4.0, 2.0, 3.0],
    );
    let (a, b) = (wilcoxon_signed_rank(&x, &y), wilcoxon_signed_rank(&y, &x));
    assert_eq!(
        a.map(|r| (r.statistic, r.p_value)),
        b.map(|r| (r.statistic, r.p_value))
    );
}

#[test]
fn wilcoxon_ties_are_float_equality_as_in_scipy() {
    // 3.2 - 2.8 = 0.40000000000000036 and 3.6 - 3.2 = 0.3999999999999999: not tied in f64, so
    // (as scipy does) no ties, and the exact distribution; tied on a common grid, a permutation.
    let res = wilcoxon_signed_rank(&[3.2, 3.6, 5.0], &[2.8, 3.2, 4.0]).expect("defined");
    assert_eq!(
        (res.method, res.statistic, res.p_value),
        (WilcoxonMethod::Exact, 0.0, 0.25)
    );
    let res = wilcoxon_signed_rank(&[4.0, 4.0, 5.0], &[3.6, 3.6, 4.0]).expect("defined");
    // (scipy: statistic 0, p 0.25 for both)
    assert_eq!(
        (res.method, res.p_value),
        (WilcoxonMethod::Permutation, 0.25)
    );
}

#[test]
fn bootstrap_halves_match_numpy() {
    for (i, case) in fixture().bootstrap.iter().enumerate() {
        let means = bootstrap_means_from_indices(&case.xs, &case.indices).expect("valid indices");
        assert_eq!(means.len(), case.means.len());
        for (k, (g, w)) in means.iter().zip(&case.means).enumerate() {
            assert_close(*g, *w, &format!("case {i} resample {k} mean"));
        }
        let (lo, hi) = percentile_interval(&means, 0.95).expect("interval");
        assert_close(lo, case.lo, &format!("case {i} lo"));
        assert_close(hi, case.hi, &format!("case {i} hi"));
    }
}

#[test]
fn percentile_matches_numpy() {
    for case in fixture().percentile {
        for (q, want) in case.q.iter().zip(&case.expected) {
            let got = percentile(&case.values, *q).expect("valid percentile");
            assert_close(
                got,
                *want,
                &format!("percentile {q} of {} values", case.values.len()),
            );
        }
    }
}

#[test]
fn seeded_bootstrap_is_deterministic_and_sensible() {
    // Per-item mean ratings: non-integers, so resample means rarely coincide and another seed
    // moves the interval (integer ratings give means on a 1/n grid, often the same interval).
    let xs = [
        4.33, 4.67, 3.0, 3.67, 4.0, 2.33, 5.0, 3.33, 4.0, 3.67, 4.67, 2.67,
    ];
    let a = bootstrap_mean_ci(&xs, 2000, 0.95, 42).expect("ci");
    assert_eq!(a, bootstrap_mean_ci(&xs, 2000, 0.95, 42).expect("ci"));
    assert_ne!(a, bootstrap_mean_ci(&xs, 2000, 0.95, 43).expect("ci"));
    let (mean, std) = mean_std(&xs);
    assert!(a.0 < mean && mean < a.1, "{a:?} around {mean}");
    // The percentile interval of a mean is about mean +- 1.96 sd / sqrt(n) (sd with ddof = 0).
    let half =
        1.96 * std * ((xs.len() as f64 - 1.0) / xs.len() as f64).sqrt() / (xs.len() as f64).sqrt();
    assert!(
        (a.1 - a.0 - 2.0 * half).abs() < 0.15 * half,
        "{a:?} vs +-{half}"
    );
    // A constant sample has a degenerate interval.
    assert_eq!(
        bootstrap_mean_ci(&[3.0; 5], 100, 0.95, 0).unwrap(),
        (3.0, 3.0)
    );
}

#[test]
fn invalid_arguments_are_errors() {
    use StudyError as E;
    assert!(matches!(
        bootstrap_mean_ci(&[], 100, 0.95, 0),
        Err(E::Empty)
    ));
    assert!(matches!(
        bootstrap_mean_ci(&[1.0], 0, 0.95, 0),
        Err(E::NoResamples)
    ));
    assert!(matches!(
        bootstrap_mean_ci(&[1.0], 10, 1.0, 0),
        Err(E::InvalidConfidence(c)) if c == 1.0
    ));
    assert!(matches!(
        bootstrap_mean_ci(&[1.0], 10, f64::NAN, 0),
        Err(E::InvalidConfidence(_))
    ));
    assert!(matches!(
        bootstrap_means_from_indices(&[1.0, 2.0], &[vec![0, 1], vec![2]]),
        Err(E::IndexOutOfRange {
            resample: 1,
            index: 2,
            len: 2
        })
    ));
    assert!(matches!(
        bootstrap_means_from_indices(&[1.0], &[vec![]]),
        Err(E::EmptyResample { resample: 0 })
    ));
    assert!(matches!(percentile(&[], 50.0), Err(E::Empty)));
    assert!(matches!(
        percentile(&[1.0], 100.5),
        Err(E::InvalidPercentile(q)) if q == 100.5
    ));
    assert!(
        percentile(&[1.0, f64::NAN], 50.0)
            .expect("NaN propagates")
            .is_nan()
    );
    assert!(matches!(
        percentile_interval(&[1.0, 2.0], 0.0),
        Err(E::InvalidConfidence(c)) if c == 0.0
    ));
}

#[test]
fn mean_std_edges() {
    let (m, s) = mean_std(&[]);
    assert!(m.is_nan() && s.is_nan());
    let (m, s) = mean_std(&[4.0]);
    assert!(m == 4.0 && s.is_nan());
    assert_eq!(mean_std(&[2.0, 2.0, 2.0]), (2.0, 0.0));
    // ddof = 1: [1, 2, 3, 4, 5] has variance 2.5, not 2.
    assert_eq!(mean_std(&[1.0, 2.0, 3.0, 4.0, 5.0]), (3.0, 2.5f64.sqrt()));
}

#[test]
fn krippendorff_edges() {
    let s = Some;
    // No data, one value everywhere, a single rater, nothing rated twice: undefined.
    assert_eq!(krippendorff_alpha_ordinal(&[]), None);
    assert_eq!(krippendorff_alpha_ordinal(&[vec![], vec![]]), None);
    assert_eq!(
        krippendorff_alpha_ordinal(&[vec![s(3.0), s(3.0)], vec![s(3.0), None]]),
        None
    );
    assert_eq!(
        krippendorff_alpha_interval(&[vec![s(1.0), s(2.0), s(5.0)]]),
        None
    );
    assert_eq!(
        krippendorff_alpha_ordinal(&[vec![s(1.0), None], vec![None, s(2.0)]]),
        None
    );
    // Only one value among the pairable ratings (5 only appears in a unit rated once): D_e = 0.
    assert_eq!(
        krippendorff_alpha_ordinal(&[vec![s(4.0), s(4.0), None], vec![s(4.0), s(4.0), s(5.0)]]),
        None
    );
    // NaN is missing, as in the package; infinity is refused.
    let with_nan = [
        vec![s(1.0), s(2.0), s(f64::NAN), s(4.0)],
        vec![s(1.0), s(3.0), s(3.0), s(4.0)],
    ];
    let with_none = [
        vec![s(1.0), s(2.0), None, s(4.0)],
        vec![s(1.0), s(3.0), s(3.0), s(4.0)],
    ];
    assert_eq!(
        krippendorff_alpha_ordinal(&with_nan),
        krippendorff_alpha_ordinal(&with_none)
    );
    assert_eq!(
        krippendorff_alpha_ordinal(&[vec![s(1.0), s(f64::INFINITY)], vec![s(1.0), s(2.0)]]),
        None
    );
    // Ragged rows: the short row is missing its last units.
    let ragged = [vec![s(1.0), s(2.0)], vec![s(1.0), s(3.0), s(4.0)]];
    let padded = [vec![s(1.0), s(2.0), None], vec![s(1.0), s(3.0), s(4.0)]];
    assert_eq!(
        krippendorff_alpha_interval(&ragged),
        krippendorff_alpha_interval(&padded)
    );
    // Perfect agreement with variation between units is 1.
    let same = vec![s(1.0), s(3.0), s(5.0), s(2.0)];
    assert_eq!(
        krippendorff_alpha_ordinal(&[same.clone(), same.clone(), same]),
        Some(1.0)
    );
}
