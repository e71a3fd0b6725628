//! The study's statistics on `f64`, each written to give what its reference gives (numpy 2.4,
//! scipy 1.17, krippendorff 0.9; the versions the fixture records), so that a report made here
//! can be checked with the usual Python tools. Where the reference has a quirk (a value domain
//! that includes unpaired values, scipy's choice between exact and approximate p values), the
//! quirk is reproduced and documented rather than "fixed".

use std::f64::consts::{FRAC_1_SQRT_2, PI};

use serde::{Deserialize, Serialize};

use crate::StudyError;

/// Mean and sample standard deviation of `xs`: `(numpy.mean(xs), numpy.std(xs, ddof=1))`.
///
/// The standard deviation divides by n - 1 (ddof = 1), the unbiased-variance convention a study
/// report states, not numpy's default ddof = 0. Two passes (the mean, then squared deviations
/// from it), so a large common offset costs no digits. An empty `xs` gives `(NaN, NaN)` and a
/// single value `(x, NaN)`, as numpy does (with a warning there).
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, f64::NAN);
    }
    let squares: f64 = xs.iter().map(|x| (x - mean) * (x - mean)).sum();
    (mean, (squares / (n - 1.0)).sqrt())
}

// ---------------------------------------------------------------------------------------------
// Krippendorff's alpha
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Ordinal,
    Interval,
}

/// Krippendorff's alpha for ordinal data, as `krippendorff.alpha(reliability_data=data,
/// level_of_measurement="ordinal")` (package `krippendorff` 0.9) computes it.
///
/// `data` is raters x units (`data[rater][unit]`), `None` (or NaN) where a rater did not rate a
/// unit; shorter rows are missing their last units. As in the package:
/// - the value domain is the sorted distinct values present, including values only seen in units
///   rated once; such values have no pairable count, so they change nothing (the ordinal distance
///   between c and k sums the pairable counts of the values from c to k, and theirs are 0);
/// - units with fewer than two ratings are dropped (they contain no pair);
/// - the coincidence matrix weighs each unit's pairs by 1 / (m_u - 1), m_u its number of ratings,
///   and alpha = 1 - D_o / D_e with D_e from the pairable value counts n_v.
///
/// `None` where the package raises or returns NaN: no unit with two ratings, fewer than two
/// distinct values, or no variation among the pairable values (zero expected disagreement).
/// Also `None` for an infinite value, which has no ordinal or interval meaning here.
pub fn krippendorff_alpha_ordinal(data: &[Vec<Option<f64>>]) -> Option<f64> {
    krippendorff_alpha(data, Level::Ordinal)
}

/// Krippendorff's alpha for interval data (squared difference of the values as the distance), as
/// `krippendorff.alpha(reliability_data=data, level_of_measurement="interval")` computes it.
/// Same data layout, unit handling and `None` cases as [`krippendorff_alpha_ordinal`].
pub fn krippendorff_alpha_interval(data: &[Vec<Option<f64>>]) -> Option<f64> {
    krippendorff_alpha(data, Level::Interval)
}

fn krippendorff_alpha(data: &[Vec<Option<f64>>], level: Level) -> Option<f64> {
    // NaN is the package's "missing"; accept it as such.
    let present = |v: &Option<f64>| v.filter(|x| !x.is_nan());
    let mut domain: Vec<f64> = data.iter().flatten().filter_map(present).collect();
    if domain.iter().any(|x| x.is_infinite()) {
        return None;
    }
    domain.sort_by(f64::total_cmp);
    domain.dedup_by(|a, b| a == b); // -0.0 == 0.0, as in np.unique
    if domain.len() < 2 {
        return None;
    }
    // For finite values `<` finds the index whose value equals x (also for -0.0 / 0.0).
    let index_of = |x: f64| domain.partition_point(|d| *d < x);

    // Each pairable unit as its distinct value indices with their counts.
    let n_units = data.iter().map(Vec::len).max().unwrap_or(0);
    let mut units: Vec<(Vec<(usize, f64)>, f64)> = Vec::new();
    let mut indices = Vec::new();
    for u in 0..n_units {
        indices.clear();
        indices.extend(
            data.iter()
                .filter_map(|row| row.get(u).and_then(present))
                .map(index_of),
        );
        if indices.len() < 2 {
            continue;
        }
        indices.sort_unstable();
        let mut counts: Vec<(usize, f64)> = Vec::new();
        for &i in &indices {
            match counts.last_mut() {
                Some((last, c)) if *last == i => *c += 1.0,
                _ => counts.push((i, 1.0)),
            }
        }
        units.push((counts, indices.len() as f64));
    }
    if units.is_empty() {
        return None;
    }

    // n_v: the column sums of the coincidence matrix o, summed as the package sums them (each
    // unit's row (n_c n_k - [c = k] n_c) / (m_u - 1)); mathematically the pairable count of v.
    let v = domain.len();
    let mut n_v = vec![0.0; v];
    for (counts, m) in &units {
        for &(c, nc) in counts {
            for &(k, nk) in counts {
                let same = if c == k { nc } else { 0.0 };
                n_v[k] += (nc * nk - same) / (m - 1.0);
            }
        }
    }
    if n_v.iter().filter(|&&x| x > 0.0).count() < 2 {
        return None; // every pairable value the same: D_e = 0 (the package returns 0/0 = NaN)
    }
    let n: f64 = n_v.iter().sum();
    let mut cumulative = Vec::with_capacity(v + 1);
    cumulative.push(0.0);
    for &x in &n_v {
        cumulative.push(cumulative[cumulative.len() - 1] + x);
    }
    let distance = |c: usize, k: usize| -> f64 {
        match level {
            Level::Interval => (domain[c] - domain[k]) * (domain[c] - domain[k]),
            Level::Ordinal => {
                let (lo, hi) = (c.min(k), c.max(k));
                let between = cumulative[hi + 1] - cumulative[lo] - (n_v[lo] + n_v[hi]) / 2.0;
                between * between
            }
        }
    };
    // Off-diagonal terms only: the distance of a value to itself is 0 at both levels.
    let mut observed = 0.0;
    for (counts, m) in &units {
        for &(c, nc) in counts {
            for &(k, nk) in counts {
                if c != k {
                    observed += nc * nk / (m - 1.0) * distance(c, k);
                }
            }
        }
    }
    let mut expected = 0.0;
    for c in 0..v {
        for k in 0..v {
            if c != k && n_v[c] > 0.0 && n_v[k] > 0.0 {
                expected += n_v[c] * n_v[k] / (n - 1.0) * distance(c, k);
            }
        }
    }
    if expected == 0.0 {
        return None;
    }
    Some(1.0 - observed / expected)
}

// ---------------------------------------------------------------------------------------------
// Wilcoxon signed-rank test
// ---------------------------------------------------------------------------------------------

/// How the p value of [`wilcoxon_signed_rank_with`] is computed (scipy's `method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WilcoxonMethod {
    /// scipy's default rule (see [`wilcoxon_signed_rank`]); never the method of a result.
    Auto,
    /// The exact null distribution of R+ for ranks 1..n (`method="exact"`). With ties the
    /// statistic is rounded conservatively (down for the upper tail, up for the lower), as scipy
    /// does since gh-19872.
    Exact,
    /// All 2^n sign flips of the observed (tied, average) ranks: scipy's `PermutationMethod()`,
    /// which enumerates them exhaustively for n <= 13. Computed here by counting rank sums, not
    /// by enumeration, so it is exact for any n (but O(n^3) in time).
    Permutation,
    /// Normal approximation with the tie correction of the variance and no continuity correction
    /// (`method="asymptotic"`, scipy's default `correction=False`).
    Asymptotic,
}

/// A paired signed-rank test's result.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Wilcoxon {
    /// min(R+, R-), the sums of the (average) ranks of |x - y| over positive and negative
    /// differences: scipy's two-sided `statistic`.
    pub statistic: f64,
    /// Two-sided p value.
    pub p_value: f64,
    /// Number of non-zero differences (the pairs that were ranked).
    pub n: usize,
    /// Number of zero differences, dropped (zero_method="wilcox").
    pub zeros: usize,
    /// How `p_value` was computed (the resolved method, never `Auto`).
    pub method: WilcoxonMethod,
}

/// Paired two-sided Wilcoxon signed-rank test of `x` against `y`, as `scipy.stats.wilcoxon(x, y)`
/// computes it with its defaults (scipy 1.17: zero_method="wilcox", correction=False,
/// method="auto").
///
/// Zero differences are dropped, tied |differences| get their average rank, and the statistic is
/// min(R+, R-). The p value follows scipy's `auto` rule, where len(d) counts all pairs, zero
/// differences included:
/// - len(d) > 50: normal approximation ([`WilcoxonMethod::Asymptotic`]);
/// - otherwise, no ties and no zeros: exact distribution ([`WilcoxonMethod::Exact`]);
/// - otherwise len(d) <= 13: every sign flip of the tied ranks ([`WilcoxonMethod::Permutation`];
///   scipy's exhaustive permutation test);
/// - otherwise: normal approximation.
///
/// With 5-point ratings ties and zeros are the rule, so per-rating tests mostly take the normal
/// approximation; per-item mean ratings (non-integers) reach the exact one. Ties are exact `f64`
/// equality of the differences, as in scipy: means computed in floating point can differ in the
/// last bit where they are equal on paper (3.2 - 2.8 != 3.6 - 3.2), which unties them for both.
///
/// `None` where scipy's answer is NaN or meaningless: `x` and `y` of different lengths, empty
/// inputs, a non-finite value, or no non-zero difference (scipy then reports statistic 0 with
/// p = 1 for len(d) <= 13 and NaN beyond).
pub fn wilcoxon_signed_rank(x: &[f64], y: &[f64]) -> Option<Wilcoxon> {
    wilcoxon_signed_rank_with(x, y, WilcoxonMethod::Auto)
}

/// [`wilcoxon_signed_rank`] with the p value's method chosen by the caller, as
/// `scipy.stats.wilcoxon(x, y, method=...)` (`Permutation` as `method=PermutationMethod()`, which
/// scipy only makes exhaustive for n <= 13).
pub fn wilcoxon_signed_rank_with(x: &[f64], y: &[f64], method: WilcoxonMethod) -> Option<Wilcoxon> {
    if x.len() != y.len() || x.is_empty() || x.iter().chain(y).any(|v| !v.is_finite()) {
        return None;
    }
    let d: Vec<f64> = x.iter().zip(y).map(|(a, b)| a - b).collect();
    let zeros = d.iter().filter(|&&v| v == 0.0).count();
    let nonzero: Vec<f64> = d.iter().copied().filter(|&v| v != 0.0).collect();
    if nonzero.is_empty() {
        return None;
    }
    let ranked = SignedRanks::new(&nonzero);
    let method = match method {
        WilcoxonMethod::Auto if d.len() > 50 => WilcoxonMethod::Asymptotic,
        WilcoxonMethod::Auto if !ranked.has_ties() && zeros == 0 => WilcoxonMethod::Exact,
        WilcoxonMethod::Auto if d.len() <= 13 => WilcoxonMethod::Permutation,
        WilcoxonMethod::Auto => WilcoxonMethod::Asymptotic,
        other => other,
    };
    let p_value = match method {
        WilcoxonMethod::Exact => ranked.p_exact(),
        WilcoxonMethod::Permutation => ranked.p_permutation(),
        WilcoxonMethod::Asymptotic | WilcoxonMethod::Auto => ranked.p_asymptotic(),
    };
    Some(Wilcoxon {
        statistic: ranked.r_plus.min(ranked.r_minus),
        p_value,
        n: nonzero.len(),
        zeros,
        method,
    })
}

/// Average ranks of the non-zero |differences|. Average ranks are multiples of 1/2, so they are
/// also kept doubled as integers: rank sums are then counted exactly, which is what scipy's
/// floating comparisons (with their 100 eps tolerance) amount to.
struct SignedRanks {
    /// Doubled average rank of each difference.
    doubled: Vec<usize>,
    /// Doubled R+.
    r_plus_doubled: usize,
    r_plus: f64,
    r_minus: f64,
    /// Sizes of the groups of tied |differences| (1 for an untied one).
    tie_groups: Vec<usize>,
}

impl SignedRanks {
    fn new(d: &[f64]) -> Self {
        let mut order: Vec<usize> = (0..d.len()).collect();
        order.sort_by(|&a, &b| d[a].abs().total_cmp(&d[b].abs()));
        let mut doubled = vec![0; d.len()];
        let mut tie_groups = Vec::new();
        let mut start = 0;
        while start < order.len() {
            let value = d[order[start]].abs();
            let end = start
                + order[start..]
                    .iter()
                    .take_while(|&&i| d[i].abs() == value)
                    .count();
            let size = end - start;
            // ordinal ranks start+1 ..= end average to (start + 1 + end) / 2
            let rank2 = start + 1 + end;
            for &i in &order[start..end] {
                doubled[i] = rank2;
            }
            tie_groups.push(size);
            start = end;
        }
        let doubled_sum = |positive: bool| -> usize {
            d.iter()
                .zip(&doubled)
                .filter(|(v, _)| if positive { **v > 0.0 } else { **v < 0.0 })
                .map(|(_, r)| r)
                .sum()
        };
        let r_plus_doubled = doubled_sum(true);
        // Halves of integers: exactly the sums of average ranks scipy forms in floating point.
        let r_plus = r_plus_doubled as f64 / 2.0;
        let r_minus = doubled_sum(false) as f64 / 2.0;
        Self {
            doubled,
            r_plus_doubled,
            r_plus,
            r_minus,
            tie_groups,
        }
    }

    fn has_ties(&self) -> bool {
        self.tie_groups.iter().any(|&t| t > 1)
    }

    /// scipy's normal approximation: z = (R+ - n(n+1)/4) / se with
    /// se^2 = (n(n+1)(2n+1) - sum(t^3 - t) / 2) / 24, and p = 2 Phi(-|z|) (in scipy's order of
    /// operations).
    fn p_asymptotic(&self) -> f64 {
        let count = self.doubled.len() as f64;
        let mean = count * (count + 1.0) * 0.25;
        let variance24 = count * (count + 1.0) * (2.0 * count + 1.0);
        let tie_correction: f64 = self
            .tie_groups
            .iter()
            .map(|&t| (t * t * t - t) as f64)
            .sum();
        let se = ((variance24 - tie_correction / 2.0) / 24.0).sqrt();
        let z = (self.r_plus - mean) / se;
        // 2 * ndtr(-|z|) = erfc(|z| / sqrt 2)
        erfc(z.abs() * FRAC_1_SQRT_2)
    }

    /// scipy's `method="exact"`: the distribution of R+ over ranks 1..n, p = 2 min(P(R+ >=
    /// floor r), P(R+ <= ceil r)) clipped to 1.
    fn p_exact(&self) -> f64 {
        let n = self.doubled.len();
        let pmf = sign_flip_pmf((1..=n).map(|k| 2 * k));
        // Doubled units: floor(r) and ceil(r) of r = r_plus_doubled / 2, doubled again.
        let floor2 = self.r_plus_doubled / 2 * 2;
        let ceil2 = self.r_plus_doubled.div_ceil(2) * 2;
        (2.0 * upper_tail(&pmf, floor2).min(lower_tail(&pmf, ceil2))).min(1.0)
    }

    /// Every sign flip of the observed ranks: p = 2 min(P(R+ <= r), P(R+ >= r)) clipped to 1, as
    /// scipy's exhaustive `permutation_test` of R+ (zero differences flip to themselves and
    /// change no proportion).
    fn p_permutation(&self) -> f64 {
        let pmf = sign_flip_pmf(self.doubled.iter().copied());
        let r = self.r_plus_doubled;
        (2.0 * lower_tail(&pmf, r).min(upper_tail(&pmf, r))).min(1.0)
    }
}

/// Distribution of sum(w_i s_i) over independent fair s_i in {0, 1}: `pmf[k]` = P(sum = k). Built
/// one weight at a time with halving, as scipy's `_get_wilcoxon_distr` builds its table.
fn sign_flip_pmf(weights: impl Iterator<Item = usize>) -> Vec<f64> {
    let mut pmf = vec![1.0];
    for w in weights {
        let mut next = vec![0.0; pmf.len() + w];
        for (k, &p) in pmf.iter().enumerate() {
            next[k] += 0.5 * p;
            next[k + w] += 0.5 * p;
        }
        pmf = next;
    }
    pmf
}

/// P(S <= k).
fn lower_tail(pmf: &[f64], k: usize) -> f64 {
    pmf.iter().take(k.saturating_add(1)).sum()
}

/// P(S >= k).
fn upper_tail(pmf: &[f64], k: usize) -> f64 {
    pmf.iter().skip(k).sum()
}

/// The complementary error function, to about 1e-15 absolute (scipy's `ndtr` is Cephes'). Below
/// 2.5 through the series erf(x) = 2/sqrt(pi) e^(-x^2) sum_k (2x^2)^k x / (1 3 5 ... (2k+1)),
/// whose terms are all positive (no cancellation); above, through the continued fraction
/// erfc(x) = e^(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...)))) (modified Lentz), which
/// keeps the tail's relative precision where 1 - erf would lose it.
fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x < 0.0 {
        return 2.0 - erfc(-x);
    }
    let x2 = x * x;
    if x < 2.5 {
        let (mut term, mut sum) = (x, x);
        for k in 1..200 {
            term *= 2.0 * x2 / (2 * k + 1) as f64;
            sum += term;
            if term <= sum * 1e-17 {
                break;
            }
        }
        return 1.0 - 2.0 / PI.sqrt() * (-x2).exp() * sum;
    }
    const TINY: f64 = 1e-300;
    let (mut f, mut c, mut d) = (x, x, 0.0);
    for k in 1..1000 {
        let a = k as f64 * 0.5;
        d = x + a * d;
        d = 1.0 / if d == 0.0 { TINY } else { d };
        c = x + a / c;
        if c == 0.0 {
            c = TINY;
        }
        let delta = c * d;
        f *= delta;
        if (delta - 1.0).abs() < 1e-16 {
            break;
        }
    }
    (-x2).exp() / (PI.sqrt() * f)
}

// ---------------------------------------------------------------------------------------------
// Bootstrap
// ---------------------------------------------------------------------------------------------

/// The means of `xs` over each resample of `indices` (one row of indices into `xs` per
/// resample): `xs[indices].mean(axis=1)` in numpy. Errors on an empty row or an index past `xs`.
pub fn bootstrap_means_from_indices(
    xs: &[f64],
    indices: &[Vec<usize>],
) -> Result<Vec<f64>, StudyError> {
    indices
        .iter()
        .enumerate()
        .map(|(resample, row)| resample_mean(xs, row, resample))
        .collect()
}

fn resample_mean(xs: &[f64], row: &[usize], resample: usize) -> Result<f64, StudyError> {
    if row.is_empty() {
        return Err(StudyError::EmptyResample { resample });
    }
    let mut sum = 0.0;
    for &index in row {
        let x = xs.get(index).ok_or(StudyError::IndexOutOfRange {
            resample,
            index,
            len: xs.len(),
        })?;
        sum += x;
    }
    Ok(sum / row.len() as f64)
}

/// The q-th percentile (0 <= q <= 100) of `values`: `numpy.percentile(values, q)` with its
/// default `method="linear"`. The sorted values are interpolated at index (n - 1) q / 100, with
/// numpy's two-sided form of the interpolation (a + (b - a) t below t = 0.5, b - (b - a)(1 - t)
/// from it), so results agree to the last bit where the arithmetic allows. A NaN among the values
/// gives NaN, as in numpy.
pub fn percentile(values: &[f64], q: f64) -> Result<f64, StudyError> {
    if values.is_empty() {
        return Err(StudyError::Empty);
    }
    if !(0.0..=100.0).contains(&q) {
        return Err(StudyError::InvalidPercentile(q));
    }
    if values.iter().any(|v| v.is_nan()) {
        return Ok(f64::NAN);
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let last = sorted.len() - 1;
    let virtual_index = last as f64 * (q / 100.0);
    if virtual_index >= last as f64 {
        return Ok(sorted[last]);
    }
    let below = virtual_index.floor();
    let t = virtual_index - below;
    let i = below as usize;
    let (a, b) = (sorted[i], sorted[i + 1]);
    let diff = b - a;
    Ok(if t >= 0.5 {
        b - diff * (1.0 - t)
    } else {
        a + diff * t
    })
}

/// The central `confidence` interval of `values` by percentiles: for 0.95,
/// `numpy.percentile(values, [2.5, 97.5])`. The tails are computed as (100 - 100 c) / 2 so that
/// common confidences give numpy's exact percentages (0.95 -> 2.5 and 97.5; (1 - 0.95) / 2 would
/// give 2.5000000000000022).
pub fn percentile_interval(values: &[f64], confidence: f64) -> Result<(f64, f64), StudyError> {
    if !(confidence > 0.0 && confidence < 1.0) {
        return Err(StudyError::InvalidConfidence(confidence));
    }
    let tail = (100.0 - 100.0 * confidence) / 2.0;
    Ok((percentile(values, tail)?, percentile(values, 100.0 - tail)?))
}

/// Percentile bootstrap `confidence` interval of the mean of `xs`: `resamples` resamples of
/// `xs.len()` indices drawn uniformly with replacement from [`Xoshiro256StarStar`] seeded with
/// `seed`, their means, and [`percentile_interval`] of those. Deterministic for a seed; the
/// stream is decorr's own (not numpy's), which is why the two halves are public and checked
/// against numpy separately. One resample's indices are held at a time, so memory stays O(n).
pub fn bootstrap_mean_ci(
    xs: &[f64],
    resamples: usize,
    confidence: f64,
    seed: u64,
) -> Result<(f64, f64), StudyError> {
    if xs.is_empty() {
        return Err(StudyError::Empty);
    }
    if resamples == 0 {
        return Err(StudyError::NoResamples);
    }
    if resamples > crate::MAX_RESAMPLES {
        return Err(StudyError::TooManyResamples {
            resamples,
            max: crate::MAX_RESAMPLES,
        });
    }
    if !(confidence > 0.0 && confidence < 1.0) {
        return Err(StudyError::InvalidConfidence(confidence));
    }
    let mut rng = Xoshiro256StarStar::seed_from_u64(seed);
    let mut row = vec![0; xs.len()];
    let mut means = Vec::with_capacity(resamples);
    for resample in 0..resamples {
        for index in row.iter_mut() {
            *index = rng.below(xs.len());
        }
        means.push(resample_mean(xs, &row, resample)?);
    }
    percentile_interval(&means, confidence)
}

/// xoshiro256** (Blackman and Vigna), seeded through SplitMix64 as its authors recommend: a small,
/// fast generator whose stream is fixed by this code alone, so a seeded bootstrap (or a study's
/// random order) reproduces on any machine and any version of any dependency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xoshiro256StarStar {
    s: [u64; 4],
}

impl Xoshiro256StarStar {
    /// The state is four consecutive SplitMix64 outputs from `seed` (never all zero).
    pub fn seed_from_u64(seed: u64) -> Self {
        let mut state = seed;
        let s = [
            splitmix64(&mut state),
            splitmix64(&mut state),
            splitmix64(&mut state),
            splitmix64(&mut state),
        ];
        Self { s }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform integer in 0..n without modulo bias (Lemire's multiply-shift with rejection);
    /// 0 when n = 0.
    pub fn below(&mut self, n: usize) -> usize {
        let n = n as u64;
        if n == 0 {
            return 0;
        }
        let mut m = u128::from(self.next_u64()) * u128::from(n);
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = u128::from(self.next_u64()) * u128::from(n);
            }
        }
        (m >> 64) as usize
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bootstrap_past_the_bound_is_an_error_not_an_allocation() {
        let got = bootstrap_mean_ci(&[1.0, 2.0], 100_000_000_000, 0.95, 0);
        assert!(
            matches!(got, Err(StudyError::TooManyResamples { max, .. }) if max == crate::MAX_RESAMPLES),
            "{got:?}"
        );
        assert!(bootstrap_mean_ci(&[1.0, 2.0], crate::MAX_RESAMPLES + 1, 0.95, 0).is_err());
        assert!(bootstrap_mean_ci(&[1.0, 2.0], crate::MAX_RESAMPLES, 0.95, 0).is_ok());
    }

    #[test]
    fn splitmix64_matches_its_reference_outputs() {
        // splitmix64.c seeded with 1234567 (the values every port checks).
        let mut state = 1_234_567;
        let got: Vec<u64> = (0..5).map(|_| splitmix64(&mut state)).collect();
        assert_eq!(
            got,
            [
                6457827717110365317,
                3203168211198807973,
                9817491932198370423,
                4593380528125082431,
                16408922859458223821
            ]
        );
    }

    #[test]
    fn xoshiro256starstar_matches_the_reference_implementation() {
        // xoshiro256starstar.c from the state {1, 2, 3, 4}.
        let mut rng = Xoshiro256StarStar { s: [1, 2, 3, 4] };
        let got: Vec<u64> = (0..10).map(|_| rng.next_u64()).collect();
        assert_eq!(
            got,
            [
                11520,
                0,
                1509978240,
                1215971899390074240,
                1216172134540287360,
                607988272756665600,
                16172922978634559625,
                8476171486693032832,
                10595114339597558777,
                2904607092377533576
            ]
        );
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut rng = Xoshiro256StarStar::seed_from_u64(7);
        let mut counts = [0usize; 12];
        for _ in 0..120_000 {
            counts[rng.below(12)] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
        assert_eq!(rng.below(0), 0);
        assert_eq!(rng.below(1), 0);
    }

    #[test]
    fn erfc_matches_scipy() {
        // (x, scipy.special.erfc(x)) across both branches and the switch at 2.5.
        let cases = [
            (0.0, 1.0),
            (0.1, 0.8875370839817152),
            (0.5, 0.4795001221869535),
            (1.0, 0.15729920705028516),
            (1.3859038243496777, 0.050000000000000024),
            (2.0, 0.004677734981047266),
            (2.4999999, 0.00040695223527343596),
            (2.5, 0.00040695201744495886),
            (3.0, 2.2090496998585445e-05),
            (4.0, 1.541725790028002e-08),
            (6.0, 2.1519736712498913e-17),
            (10.0, 2.0884875837625446e-45),
            (-1.0, 1.8427007929497148),
        ];
        for (x, want) in cases {
            let got = erfc(x);
            assert!(
                (got - want).abs() <= 1e-15 || ((got - want) / want).abs() <= 1e-13,
                "erfc({x}) = {got:e}, scipy {want:e}"
            );
        }
    }

    #[test]
    fn sign_flip_pmf_sums_to_one_and_is_symmetric() {
        let pmf = sign_flip_pmf(1..=10);
        assert_eq!(pmf.len(), 56);
        assert!((pmf.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        for k in 0..pmf.len() {
            assert_eq!(pmf[k], pmf[pmf.len() - 1 - k]);
        }
        assert_eq!(pmf[0], 1.0 / 1024.0);
    }
}
