//! The quantities of METHOD.md on head-averaged maps (`a[i][j]`, rows are queries), for one
//! prompt whose focus (target `t`, correlated token `c`, `S = 1..t`) is fixed:
//! Eq. 2 (`L_train`), Eq. 3 (`L_corr`), Eq. 4 (`L_align`), Eq. 5 (`L_val`) and the selection rule.

use serde::Serialize;

/// The fixed indices of one training prompt.
#[derive(Debug, Clone, Serialize)]
pub struct Focus {
    /// `t`: the target token.
    pub target: usize,
    /// `c = argmax_{s in S} A_pre[t, s]`, fixed from the pre-trained map.
    pub corr: usize,
    /// Real tokens `0..n_real` (BOS .. first EOS inclusive).
    pub n_real: usize,
}

impl Focus {
    /// `S = {1, ..., t-1}`.
    pub fn s(&self) -> std::ops::Range<usize> {
        1..self.target
    }

    /// The index in `S` of the smallest entry of `row`, the target's row (earliest on ties).
    pub fn argmin_s(&self, row: &[f32]) -> usize {
        self.s()
            .fold(None, |best: Option<usize>, s| match best {
                Some(b) if row[b] <= row[s] => Some(b),
                _ => Some(s),
            })
            .expect("S is not empty")
    }

    /// The three entries among target and correlated token that `L_align` leaves out.
    fn focused(&self, i: usize, j: usize) -> bool {
        let (t, c) = (self.target, self.corr);
        (i, j) == (c, c) || (i, j) == (t, c) || (i, j) == (t, t)
    }
}

/// Eq. 2: `A[t, c] - min_{s in S} A[t, s]`.
pub fn l_train(a: &[Vec<f32>], f: &Focus) -> f64 {
    let row = &a[f.target];
    row[f.corr] as f64 - row[f.argmin_s(row)] as f64
}

/// Eq. 3, our reading: `ln(A_ft[t, c] / A_ft[t, t])` on the fine-tuned map.
pub fn l_corr(a_ft: &[Vec<f32>], f: &Focus) -> f64 {
    let row = &a_ft[f.target];
    (row[f.corr] as f64 / row[f.target] as f64).ln()
}

/// Eq. 4: `max |A_ft - A_pre|` over the lower triangle of the real tokens, without the three
/// focused entries `(c, c)`, `(t, c)`, `(t, t)`.
pub fn l_align(a_ft: &[Vec<f32>], a_pre: &[Vec<f32>], f: &Focus) -> f64 {
    let mut worst = 0.0f64;
    for i in 0..f.n_real {
        for j in 0..=i {
            if !f.focused(i, j) {
                worst = worst.max((a_ft[i][j] as f64 - a_pre[i][j] as f64).abs());
            }
        }
    }
    worst
}

/// Eq. 5: `L_corr + tau * L_align`.
pub fn l_val(l_corr: f64, l_align: f64, tau: f64) -> f64 {
    l_corr + tau * l_align
}

/// The epoch (1-based) with the least `L_val`; ties go to the earlier epoch. `None` if empty.
pub fn select_epoch(l_vals: &[f64]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (k, &v) in l_vals.iter().enumerate() {
        if best.is_none_or(|(_, b)| v < b) {
            best = Some((k + 1, v));
        }
    }
    best.map(|(e, _)| e)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 5-token map (BOS, w1, w2, w3=target, EOS); rows sum to 1.
    fn map() -> Vec<Vec<f32>> {
        vec![
            vec![1.0, 0.0, 0.0, 0.0, 0.0],
            vec![0.8, 0.2, 0.0, 0.0, 0.0],
            vec![0.7, 0.2, 0.1, 0.0, 0.0],
            vec![0.6, 0.05, 0.25, 0.1, 0.0],
            vec![0.5, 0.1, 0.1, 0.1, 0.2],
        ]
    }

    fn focus() -> Focus {
        Focus {
            target: 3,
            corr: 2,
            n_real: 5,
        }
    }

    #[test]
    fn train_loss_is_corr_minus_min_over_s() {
        assert!((l_train(&map(), &focus()) - (0.25 - 0.05)).abs() < 1e-7);
        assert_eq!(focus().argmin_s(&map()[focus().target]), 1);
    }

    #[test]
    fn corr_loss_is_log_ratio_to_self() {
        assert!((l_corr(&map(), &focus()) - (0.25f64 / 0.1).ln()).abs() < 1e-6);
    }

    #[test]
    fn align_excludes_exactly_the_three_focused_entries() {
        let pre = map();
        let f = focus();
        // Large changes on the three focused entries are ignored...
        let mut ft = map();
        ft[2][2] += 0.5;
        ft[3][2] -= 0.2;
        ft[3][3] += 0.2;
        assert_eq!(l_align(&ft, &pre, &f), 0.0);
        // ...but not on their neighbours, and not above the diagonal or past the real tokens.
        ft[3][1] += 0.03;
        assert!((l_align(&ft, &pre, &f) - 0.03).abs() < 1e-6);
        ft[2][3] += 0.9; // upper triangle: masked, not counted
        assert!((l_align(&ft, &pre, &f) - 0.03).abs() < 1e-6);
        let short = Focus { n_real: 4, ..f };
        ft[4][0] += 0.5; // row 4 is beyond n_real = 4
        assert!((l_align(&ft, &pre, &short) - 0.03).abs() < 1e-6);
        // The BOS column and the (c, t)-adjacent (c, s) entries do count.
        ft[2][1] -= 0.07;
        assert!((l_align(&ft, &pre, &short) - 0.07).abs() < 1e-6);
    }

    #[test]
    fn selection_takes_the_least_and_the_earlier_on_ties() {
        assert_eq!(select_epoch(&[0.3, 0.1, 0.2]), Some(2));
        assert_eq!(select_epoch(&[0.3, 0.1, 0.1, 0.5]), Some(2));
        assert_eq!(select_epoch(&[-1.0]), Some(1));
        assert_eq!(select_epoch(&[]), None);
        assert_eq!(l_val(0.5, 0.1, 5.0), 1.0);
    }
}
