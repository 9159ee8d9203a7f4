//! Shares of a calibration set for scoring on many machines (METHODS.md §4):
//! shard i of n holds the sequences j with j mod n = i, in order, so the
//! n shards are disjoint, cover the set, and differ in size by at most one.
//!
//! A shard comes from `--shard i/n` or, without it, from the scheduler's
//! environment: a Slurm array job (`SLURM_ARRAY_TASK_ID` minus
//! `SLURM_ARRAY_TASK_MIN`, of `SLURM_ARRAY_TASK_COUNT`) or torchrun
//! (`RANK` of `WORLD_SIZE`), in that order.
use crate::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// Shard `index` of `count` (0 ≤ index < count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardSpec {
    pub index: usize,
    pub count: usize,
}

impl FromStr for ShardSpec {
    type Err = Error;

    /// `i/n` with 0 ≤ i < n.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::Invalid(format!("shard {s:?}: {why}"));
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| bad("expected i/n, e.g. 0/4"))?;
        let parse = |x: &str| {
            x.trim()
                .parse::<usize>()
                .map_err(|_| bad("i and n must be non-negative integers"))
        };
        ShardSpec::new(parse(i)?, parse(n)?).map_err(|e| bad(&e))
    }
}

impl fmt::Display for ShardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl ShardSpec {
    /// Shard `index` of `count`, or why there is no such shard.
    pub fn new(index: usize, count: usize) -> std::result::Result<Self, String> {
        if count == 0 {
            return Err("there must be at least one shard (n ≥ 1)".into());
        }
        if index >= count {
            return Err(format!(
                "shard index {index} is not below the shard count {count} (shards are numbered 0 to n-1)"
            ));
        }
        Ok(ShardSpec { index, count })
    }

    /// How many of a set of `total` sequences this shard holds: the
    /// j < total with j ≡ index (mod count), ⌈(total − index) / count⌉.
    pub fn held_of(&self, total: usize) -> usize {
        match total.checked_sub(self.index) {
            Some(after) if after > 0 => (after - 1) / self.count + 1,
            _ => 0,
        }
    }

    /// Whether sequence `j` of the set belongs to this shard.
    pub fn holds(&self, j: usize) -> bool {
        j % self.count == self.index
    }

    /// This shard's items of `items`, in order.
    pub fn share<T: Clone>(&self, items: &[T]) -> Vec<T> {
        items
            .iter()
            .enumerate()
            .filter(|(j, _)| self.holds(*j))
            .map(|(_, x)| x.clone())
            .collect()
    }

    /// The shard the environment `var` describes, with the variables it came
    /// from, or `None` when neither scheduler's variables are set. A
    /// variable that is set but malformed, or one of a pair without the
    /// other, is an error naming it.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<(Self, &'static str)>> {
        let num = |name: &str| -> Result<Option<usize>> {
            var(name)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        Error::Invalid(format!(
                            "environment variable {name}={v:?} is not a non-negative integer"
                        ))
                    })
                })
                .transpose()
        };
        let pick = |index: Option<usize>, count: Option<usize>, names: &'static str| match (
            index, count,
        ) {
            (None, None) => Ok(None),
            (Some(i), Some(n)) => ShardSpec::new(i, n)
                .map(|s| Some((s, names)))
                .map_err(|e| Error::Invalid(format!("{names}: {e}"))),
            _ => Err(Error::Invalid(format!(
                "{names}: only one of the two is set"
            ))),
        };
        let slurm = "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT";
        let id = num("SLURM_ARRAY_TASK_ID")?;
        let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let index = match id {
            Some(id) if id < min => {
                return Err(Error::Invalid(format!(
                    "SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}"
                )))
            }
            id => id.map(|id| id - min),
        };
        if let Some(found) = pick(index, num("SLURM_ARRAY_TASK_COUNT")?, slurm)? {
            return Ok(Some(found));
        }
        pick(num("RANK")?, num("WORLD_SIZE")?, "RANK/WORLD_SIZE")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn parses_and_refuses() {
        assert_eq!(
            "1/4".parse::<ShardSpec>().unwrap(),
            ShardSpec { index: 1, count: 4 }
        );
        for bad in ["3/2", "0/0", "2/2", "a/b", "1", "-1/2", "1/-2", ""] {
            assert!(bad.parse::<ShardSpec>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn shares_are_disjoint_and_cover() {
        let items: Vec<usize> = (0..10).collect();
        let mut seen = Vec::new();
        for i in 0..4 {
            let s = ShardSpec { index: i, count: 4 };
            let share = s.share(&items);
            assert!(share.iter().all(|&j| j % 4 == i));
            for total in 0..12 {
                let held = (0..total).filter(|&j| s.holds(j)).count();
                assert_eq!(s.held_of(total), held, "shard {s} of {total}");
            }
            seen.extend(share);
        }
        seen.sort_unstable();
        assert_eq!(seen, items);
    }

    #[test]
    fn environment_picks_the_same_shards() {
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
        ]);
        let (s, from) = ShardSpec::from_env(slurm).unwrap().unwrap();
        assert_eq!(
            (s, from.starts_with("SLURM")),
            ("2/4".parse().unwrap(), true)
        );
        let torch = env(&[("RANK", "1"), ("WORLD_SIZE", "2")]);
        let (s, _) = ShardSpec::from_env(torch).unwrap().unwrap();
        assert_eq!(s, "1/2".parse().unwrap());
        assert_eq!(ShardSpec::from_env(env(&[])).unwrap(), None);
        for bad in [
            env(&[("RANK", "2"), ("WORLD_SIZE", "2")]),
            env(&[("RANK", "x"), ("WORLD_SIZE", "2")]),
            env(&[("RANK", "1")]),
            env(&[("SLURM_ARRAY_TASK_ID", "0"), ("SLURM_ARRAY_TASK_MIN", "1")]),
            env(&[("SLURM_ARRAY_TASK_COUNT", "4")]),
        ] {
            assert!(ShardSpec::from_env(bad).is_err());
        }
    }
}
