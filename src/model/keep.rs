//! The activation-memory budget (`--activation-memory auto|BYTES`,
//! METHODS.md §4): how many layers' activations a forward pass keeps for
//! the backward pass instead of the backward recomputing them.
//!
//! The backward pass of a layer reads everything the layer's forward
//! computed up to its channels h (`forward::LayerActs`). A layer the
//! forward pass did not keep is recomputed from its stored input: its
//! attention and its q/k/v/o, gate and up products again: on SmolLM2 a
//! scoring pass costs 654 MFLOP per token recomputing every layer and 477
//! keeping every one. A kept layer costs its
//! activations' bytes from the forward to its backward instead.
//!
//! The layers kept are the top ones (l ≥ L − k): the backward pass starts
//! there and frees each as it passes, so the peak is the same for any k
//! layers and the memory comes back soonest. k is the largest count whose
//! activations fit in the budget.
use std::fmt;
use std::str::FromStr;

use super::config::ModelConfig;
use super::forward::Geometry;
use crate::{Error, Result};

/// `--activation-memory`: bytes the kept activations may take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemoryBudget {
    /// Half of the memory the backend reports available when the run
    /// starts (`Backend::available_memory`).
    #[default]
    Auto,
    /// At most this many bytes; 0 recomputes every layer.
    Bytes(u64),
}

impl FromStr for MemoryBudget {
    type Err = Error;

    /// `auto`, or a byte count with an optional binary suffix: `K`, `M`,
    /// `G`, `T` (also `KiB`, `MiB`, `GiB`, `TiB`), e.g. `512M`, `2G`, `0`.
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("auto") {
            return Ok(MemoryBudget::Auto);
        }
        let bad = || {
            Error::Invalid(format!(
                "activation memory {s:?}: expected auto or a byte count such as 0, 512M or 2G"
            ))
        };
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, suffix) = t.split_at(split);
        let shift = match suffix.to_ascii_uppercase().as_str() {
            "" | "B" => 0,
            "K" | "KIB" => 10,
            "M" | "MIB" => 20,
            "G" | "GIB" => 30,
            "T" | "TIB" => 40,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        n.checked_mul(1 << shift)
            .map(MemoryBudget::Bytes)
            .ok_or_else(bad)
    }
}

impl fmt::Display for MemoryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryBudget::Auto => write!(f, "auto"),
            MemoryBudget::Bytes(b) => write!(f, "{}", mib(*b)),
        }
    }
}

impl MemoryBudget {
    /// The budget in bytes, `Auto` being half of `available()` (the
    /// backend's available memory); an error names `flag` and suggests a
    /// byte count when `available` fails.
    pub fn resolve(self, flag: &str, available: impl FnOnce() -> Result<u64>) -> Result<u64> {
        match self {
            MemoryBudget::Bytes(b) => Ok(b),
            MemoryBudget::Auto => available().map(|a| a / 2).map_err(|e| {
                Error::Invalid(format!("{flag} auto: {e} (give a byte count instead)"))
            }),
        }
    }
}

/// Bytes of layer `l`'s kept activations at `geo` (`forward::LayerActs`,
/// f32): q and the attention output `[rows, q]`, k and v `[rows, kv]`, x'
/// `[rows, d]`, a, b and h `[rows, m]`, two rstd `[rows]`, lse
/// `[seqs, heads, t]`; with q/k norms q and k before them and their rstd
/// `[rows·heads]`, `[rows·kv_heads]`; with Gemma's sandwich norms the o
/// projection `[rows, d]` and its rstd, and the FFN output `[rows, d]`;
/// with adapters their two inputs `[rows, d]`.
pub fn layer_acts_bytes(c: &ModelConfig, l: usize, geo: Geometry, adapters: bool) -> u64 {
    let (rows, d, m) = (geo.rows() as u64, c.hidden as u64, c.ffn_widths[l] as u64);
    let (qd, kvd) = (c.q_dim() as u64, c.kv_dim() as u64);
    let mut floats =
        rows * (2 * qd + 2 * kvd + d + 3 * m + 2) + geo.seqs as u64 * c.heads as u64 * geo.t as u64;
    if c.qk_norm {
        floats += rows * (qd + kvd) + rows * (c.heads + c.kv_heads) as u64;
    }
    if c.sandwich_norms {
        floats += rows * (2 * d + 1);
    }
    if adapters {
        floats += 2 * rows * d;
    }
    4 * floats
}

/// How many of the top layers (L−1, L−2, …) keep their activations within
/// `budget` bytes, and those activations' bytes.
pub fn kept_layers(c: &ModelConfig, geo: Geometry, adapters: bool, budget: u64) -> (usize, u64) {
    let mut used = 0u64;
    let mut k = 0;
    for l in (0..c.layers).rev() {
        let b = layer_acts_bytes(c, l, geo, adapters);
        if used + b > budget {
            break;
        }
        used += b;
        k += 1;
    }
    (k, used)
}

/// One line for the log: what the budget keeps of `layers` layers at `geo`.
pub fn describe(layers: usize, geo: Geometry, budget: u64, (k, used): (usize, u64)) -> String {
    let kept = match k {
        0 => "none kept, every layer recomputed".to_string(),
        k if k == layers => format!("all {k} layers kept ({})", mib(used)),
        k => format!(
            "layers {}..{} kept ({}), {} recomputed",
            layers - k,
            layers - 1,
            mib(used),
            layers - k
        ),
    };
    format!(
        "activation memory: budget {} at {}×{}: {kept}",
        mib(budget),
        geo.seqs,
        geo.t
    )
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_budgets() {
        let p = |s: &str| s.parse::<MemoryBudget>();
        assert_eq!(p("auto").unwrap(), MemoryBudget::Auto);
        assert_eq!(p("0").unwrap(), MemoryBudget::Bytes(0));
        assert_eq!(p("512M").unwrap(), MemoryBudget::Bytes(512 << 20));
        assert_eq!(p("2GiB").unwrap(), MemoryBudget::Bytes(2 << 30));
        assert_eq!(p("1234").unwrap(), MemoryBudget::Bytes(1234));
        for bad in ["", "-1", "1.5G", "12X", "G", "99999999999999999999T"] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
    }
}
