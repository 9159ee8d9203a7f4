//! A pruning request in typed, validated values: the sparsity, the list of
//! sparsities one statistics pass serves (METHODS.md §6), and where each
//! pruned model is written.
use crate::prune::refit::RefitSpec;
use crate::prune::{Allocation, Method};
use crate::{Error, Result};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use crate::prune::export::ExportLayout;

/// A fraction of all FFN channels to remove: finite, strictly between 0 and
/// 1, and at least [`Sparsity::FINEST`] from either end.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, serde::Serialize)]
#[serde(transparent)]
pub struct Sparsity(f64);

impl Sparsity {
    /// The nearest a sparsity may come to 0 or 1: below it no model the
    /// engine reads loses a channel (a 405B model has 6.7M), and its
    /// decimals, which name output directories, would pass file-name limits.
    pub const FINEST: f64 = 1e-6;

    /// `s` if it is a valid sparsity.
    pub fn new(s: f64) -> Result<Self> {
        if !(s.is_finite() && s > 0.0 && s < 1.0) {
            return Err(Error::Invalid(format!(
                "sparsity must be strictly between 0 and 1, got {s}"
            )));
        }
        if !(Self::FINEST..=1.0 - Self::FINEST).contains(&s) {
            return Err(Error::Invalid(format!(
                "sparsity {s} is within {} of 0 or 1: it removes no channel, or all of them",
                Self::FINEST
            )));
        }
        Ok(Self(s))
    }

    pub fn get(self) -> f64 {
        self.0
    }

    /// A comma-separated list of distinct sparsities (`0.3,0.4,0.5`).
    pub fn parse_list(s: &str) -> Result<Vec<Self>> {
        let list = s
            .split(',')
            .map(|p| p.trim().parse())
            .collect::<Result<Vec<Self>>>()?;
        Self::check_distinct(&list)?;
        Ok(list)
    }

    /// Errs on an empty list or a sparsity listed twice (two models would
    /// be written to one directory).
    pub fn check_distinct(list: &[Self]) -> Result<()> {
        if list.is_empty() {
            return Err(Error::Invalid("at least one sparsity is needed".into()));
        }
        for (i, s) in list.iter().enumerate() {
            if list[..i].contains(s) {
                return Err(Error::Invalid(format!("sparsity {s} is listed twice")));
            }
        }
        Ok(())
    }
}

impl fmt::Display for Sparsity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for Sparsity {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let v: f64 = s
            .parse()
            .map_err(|_| Error::Invalid(format!("sparsity {s:?} is not a number")))?;
        Self::new(v)
    }
}

/// One pruned model to write.
#[derive(Clone, Debug)]
pub struct PruneJob {
    pub method: Method,
    pub allocation: Allocation,
    pub sparsity: Sparsity,
    /// Channels every layer keeps at least (`None`: 5% of its width, at least 1).
    pub min_keep: Option<usize>,
    /// Every layer's kept width is a multiple of this (≥ 1).
    pub align: usize,
    pub layout: ExportLayout,
    pub out: PathBuf,
    /// Replace an existing output.
    pub force: bool,
    /// Refit the kept down_proj columns (METHODS.md section 9) over the
    /// windows handed to `prune_model`.
    pub refit: Option<RefitSpec>,
}

/// `<method>-s<sparsity>`: the name of a pruned model among several.
pub fn model_name(method: Method, sparsity: Sparsity) -> String {
    format!("{}-s{sparsity}", method.name())
}

/// Where the model for each sparsity goes: with one, `out` itself; with
/// several, `out/<method>-s<sparsity>` each.
pub fn output_dirs(out: &Path, method: Method, sparsities: &[Sparsity]) -> Vec<PathBuf> {
    match sparsities {
        [_] => vec![out.to_path_buf()],
        many => many
            .iter()
            .map(|&s| out.join(model_name(method, s)))
            .collect(),
    }
}
