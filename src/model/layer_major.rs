//! What the layer-major passes share (`--layer-major`, DESIGN.md §8): a
//! chunk of batches advances one layer at a time, each batch's residual
//! stream waiting in host memory between layers, so that streamed weights
//! are uploaded once per pass per chunk rather than once per batch. The
//! scoring pass is `prune::layer_major`, perplexity `eval::ppl`, the refit
//! `prune::refit`.
use std::str::FromStr;

use half::bf16;

use crate::backend::Backend;
use crate::model::keep::MemoryBudget;
use crate::{Error, Result};

/// How the host holds a chunk's residual stream (and gradients).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResidualDtype {
    /// Exact: results equal the sequence-major pass's.
    #[default]
    F32,
    /// Half the host memory; every stored value rounded to bf16 (nearest even).
    Bf16,
}

impl FromStr for ResidualDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(ResidualDtype::F32),
            "bf16" => Ok(ResidualDtype::Bf16),
            _ => Err(Error::Invalid(format!(
                "residual dtype {s:?}: expected f32 or bf16"
            ))),
        }
    }
}

impl ResidualDtype {
    pub fn name(self) -> &'static str {
        match self {
            ResidualDtype::F32 => "f32",
            ResidualDtype::Bf16 => "bf16",
        }
    }

    /// Bytes per stored value.
    pub fn bytes(self) -> u64 {
        match self {
            ResidualDtype::F32 => 4,
            ResidualDtype::Bf16 => 2,
        }
    }
}

/// `--layer-major` with its host-memory budget and residual dtype.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerMajor {
    /// Host memory for a chunk's residual stream (`auto`: half of the
    /// available memory); sets the chunk size.
    pub host_memory: MemoryBudget,
    pub residual: ResidualDtype,
}

/// A host copy of one batch's `[rows, d]` buffer.
pub enum HostBuf {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl HostBuf {
    /// Downloads `x`, rounded to bf16 when `dtype` says so.
    pub fn store<B: Backend>(be: &B, x: &B::Buf, dtype: ResidualDtype) -> Result<Self> {
        let v = be.download(x)?;
        Ok(match dtype {
            ResidualDtype::F32 => HostBuf::F32(v),
            ResidualDtype::Bf16 => HostBuf::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
        })
    }

    /// Uploads the copy (as f32).
    pub fn load<B: Backend>(&self, be: &B) -> Result<B::Buf> {
        match self {
            HostBuf::F32(v) => be.upload(v),
            HostBuf::Bf16(v) => be.upload(&v.iter().map(|x| x.to_f32()).collect::<Vec<_>>()),
        }
    }
}

/// Groups `batches` (in order) into chunks whose host buffers (`bytes_of`
/// each) fit in `budget` bytes; refuses a budget smaller than the largest
/// batch's, naming the minimum.
pub fn chunks<T>(batches: &[T], bytes_of: impl Fn(&T) -> u64, budget: u64) -> Result<Vec<&[T]>> {
    if let Some(need) = batches.iter().map(&bytes_of).max().filter(|&n| n > budget) {
        return Err(Error::Invalid(format!(
            "--host-memory {budget} B is too small: one batch's host copy of its residual \
             stream takes {need} B (at least {:.1} MiB; or use a smaller --batch)",
            need as f64 / (1 << 20) as f64
        )));
    }
    let mut out = Vec::new();
    let mut start = 0;
    let mut used = 0u64;
    for (i, b) in batches.iter().enumerate() {
        let bytes = bytes_of(b);
        if i > start && used + bytes > budget {
            out.push(&batches[start..i]);
            start = i;
            used = 0;
        }
        used += bytes;
    }
    if start < batches.len() {
        out.push(&batches[start..]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_fill_the_budget_in_order() {
        // Batches of 2, 2, 1 and 3 sequences at 40 bytes per sequence.
        let b = [2u64, 2, 1, 3];
        let sizes = |budget| {
            chunks(&b, |&s| s * 40, budget)
                .unwrap()
                .iter()
                .map(|c| c.iter().sum::<u64>())
                .collect::<Vec<_>>()
        };
        assert_eq!(sizes(1000), vec![8]);
        assert_eq!(sizes(200), vec![5, 3]);
        assert_eq!(sizes(120), vec![2, 3, 3]);
        // The 3-sequence batch takes 120 B: a smaller budget is refused.
        let e = chunks(&b, |&s| s * 40, 119).unwrap_err().to_string();
        assert!(e.contains("120 B"), "{e}");
        assert!(chunks(&[] as &[u64], |&s| s, 100).unwrap().is_empty());
    }

    #[test]
    fn residual_dtypes_parse() {
        assert_eq!("f32".parse::<ResidualDtype>().unwrap(), ResidualDtype::F32);
        assert_eq!(
            "bf16".parse::<ResidualDtype>().unwrap(),
            ResidualDtype::Bf16
        );
        assert!("f16".parse::<ResidualDtype>().is_err());
    }
}
