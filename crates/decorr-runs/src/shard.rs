//! `--shard K/N`: a deterministic split of a job's work items (prompts x seeds for `generate`,
//! images for `eval run`) so one evaluation runs as a Slurm array or a Kubernetes indexed job.
//! K is 0-based, as `SLURM_ARRAY_TASK_ID` (with `--array=0-N-1`) and `JOB_COMPLETION_INDEX` are.
//! Shards share their output folder, so each locks only its own part of it
//! (`crate::output::lock_output`).

use std::fmt;
use std::str::FromStr;

/// Shard `index` of `count`: it owns the work items whose position `j` has `j % count == index`.
/// Round-robin rather than contiguous blocks, so every shard gets a share of every prompt and
/// shards finish at about the same time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn owns(&self, position: usize) -> bool {
        position % self.count == self.index
    }

    /// File-name tag of this shard's partial results, e.g. `shard-3-of-8`.
    pub fn tag(&self) -> String {
        format!("shard-{}-of-{}", self.index, self.count)
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "`{s}` is not a shard: write K/N with 0 <= K < N, e.g. 0/8 \
                 (K is 0-based, like SLURM_ARRAY_TASK_ID and JOB_COMPLETION_INDEX)"
            )
        };
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = k.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_splits_round_robin() {
        let s: Shard = "1/3".parse().unwrap();
        assert_eq!(s, Shard { index: 1, count: 3 });
        let owned: Vec<usize> = (0..8).filter(|&j| s.owns(j)).collect();
        assert_eq!(owned, vec![1, 4, 7]);
        // Every item belongs to exactly one shard.
        for j in 0..20 {
            let owners = (0..3)
                .filter(|&k| Shard { index: k, count: 3 }.owns(j))
                .count();
            assert_eq!(owners, 1);
        }
        assert_eq!(s.tag(), "shard-1-of-3");
    }

    #[test]
    fn refuses_bad_shards() {
        for bad in ["3/3", "1", "a/2", "0/0", "-1/2", "1/2/3"] {
            let err = bad.parse::<Shard>().unwrap_err();
            assert!(err.contains("0-based"), "{bad}: {err}");
        }
    }
}
